"""Data: conversations (`sample`), their encoding with the chat template and loss mask (`encode`), token counts
from image headers (`lengths`), batch plans (`batching`: packing, length grouping), collators (`collate`), and the
tasks that produce them (`tasks`)."""
