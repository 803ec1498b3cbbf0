"""The write path and the read path of checkpoint files, over the storage interface."""
