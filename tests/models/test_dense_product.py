"""dense_product: the product and both gradients are autodiff's of one dot_general."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm1_jax.models.dense_product import dense_product


def _reference(x, kernel, num_in):
  lead = x.ndim - num_in
  return jax.lax.dot_general(x, kernel, ((tuple(range(lead, x.ndim)), tuple(range(num_in))),
                                         ((), ())))


@pytest.mark.parametrize("x_shape,kernel_shape,num_in", [
    ((3, 5, 8), (8, 6), 1),  # A linear over [B, T, D].
    ((3, 5, 4, 2), (4, 2, 6), 2),  # Attention's output projection: (heads, head_dim) -> D.
    ((2, 5, 8), (8, 3, 4), 1),  # A query projection: D -> (heads, head_dim).
])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_autodiff(x_shape, kernel_shape, num_in, dtype, tolerance):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], x_shape, dtype)
  kernel = jax.random.normal(keys[1], kernel_shape, dtype)
  out_shape = x_shape[:len(x_shape) - num_in] + kernel_shape[num_in:]
  cotangent = jax.random.normal(keys[2], out_shape, jnp.float32)

  def loss(product):  # A non-linear loss, so the cotangent is not uniform.
    return lambda x, k: jnp.sum(jnp.sin(product(x, k, num_in).astype(jnp.float32)) * cotangent)

  ours = jax.jit(jax.value_and_grad(loss(dense_product), argnums=(0, 1)))(x, kernel)
  expected = jax.value_and_grad(loss(_reference), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(ours[0], expected[0], rtol=tolerance, atol=tolerance)
  for got, want in zip(ours[1], expected[1]):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tolerance, atol=tolerance * 10)
