"""Training building blocks (SPEC section 5): prompt sampling and the stage-2 loss."""
