"""Pure tensor functions: parameter dicts, the query update, loss sweeps. Imports nothing above it."""
