"""Command-line tools: the bench and the kernel report."""
