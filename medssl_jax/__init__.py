"""medssl_jax: self-supervised pretraining and evaluation for medical images in JAX/Flax."""
