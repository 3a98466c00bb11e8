"""What runs inside sandboxes: the node runtime and the patterns (see README.md)."""
