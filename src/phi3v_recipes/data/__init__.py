"""Data: conversations (`sample`), their encoding with the chat template and loss mask (`encode`), batching
(`collate`), and the tasks that produce them (`tasks`)."""
