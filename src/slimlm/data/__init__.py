"""Training data: sources of text, token files with document boundaries, packing and sampling."""
