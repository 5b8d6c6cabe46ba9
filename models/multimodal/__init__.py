"""Multi-modal inputs: image preprocessing in the front end, placeholder expansion, the features' hashes."""
