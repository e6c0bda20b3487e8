"""corral's command line: one module per noun, each a thin layer over the library."""
