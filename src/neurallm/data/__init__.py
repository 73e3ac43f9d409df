"""Text in, id streams out: sources → tokenizers → vocabulary → id streams → batches."""
