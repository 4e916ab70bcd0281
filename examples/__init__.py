"""Examples of bringing your own teacher, student and data to kdtune (see docs/byo.md)."""
