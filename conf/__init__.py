"""Hydra configuration tree of phi3v-recipes, shipped as the package `phi3v_recipes.conf`."""
