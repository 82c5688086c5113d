"""Stage functions: the only place that knows the whole chain."""
