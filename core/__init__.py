"""The torch-free core that every stage depends on: errors, atomic file I/O, the adapter format,
the method registry and model input info. Imports numpy and the standard library only."""
