"""Layer 3: model building blocks and models (predictors, VAEs, encoders, composite models)."""
