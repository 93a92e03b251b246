"""Ready-made predictors (callable classes, Ray Data's ``map_batches`` contract)."""
