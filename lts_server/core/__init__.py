"""The rules of licensing: pure functions over plain data, no I/O, no clock."""
