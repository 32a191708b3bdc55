"""Layer 6: sampling pipelines (inference.py) on the models of layer 3 and the samplers of layer 4."""
