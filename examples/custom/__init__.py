"""A user's own code, reached by import paths such as `examples.custom.digits:teacher`."""
