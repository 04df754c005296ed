"""The product of a linear layer, x W, with a backward pass laid out for CPUs.

    y = dense_product(x, kernel, num_in)  # x: [*lead, *in_dims], kernel: [*in_dims, *out_dims]

The forward is one dot_general. The backward computes dx = dy W^T and
dW = x^T dy, the same contractions autodiff would write. On TPU and GPU
they are exactly those (the matrix units take transposed operands for
free). On CPU, XLA's GEMM kernels want the weight gradient's contraction
(over the token dims, the major dims of both x and dy) as a plain
row-major product; left to itself, XLA transposes dy inside the
elementwise fusion that produces it (e.g. SwiGLU's backward), a strided
loop that cost more than the matmuls around it (issue 18, RESULTS.md).
Here x, already in memory from the forward (and for the lm_head the
smaller operand by far), is transposed by a standalone tiled copy that
optimization barriers keep out of any fusion, and dW = x^T dy is a
row-major GEMM.
"""

from __future__ import annotations

import functools

import jax


def _product(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
  lead = x.ndim - num_in
  return jax.lax.dot_general(x, kernel, ((tuple(range(lead, x.ndim)), tuple(range(num_in))),
                                         ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_product(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
  """x [*lead, *in_dims] . kernel [*in_dims, *out_dims] -> [*lead, *out_dims].

  num_in: how many trailing dims of x (leading dims of the kernel) are
  contracted. x and kernel share a dtype, which the result has.
  """
  return _product(x, kernel, num_in)


def _transposed_input(x: jax.Array, num_in: int) -> jax.Array:
  """x [*lead, *in] -> [*in, *lead], by a standalone tiled copy: barriers keep
  it out of the fusions that produce x (e.g. the slice of the scan's
  residual stack) and that consume it, which would make it a strided loop."""
  num_lead = x.ndim - num_in
  x = jax.lax.optimization_barrier(x)
  return jax.lax.optimization_barrier(
      x.transpose(tuple(range(num_lead, x.ndim)) + tuple(range(num_lead))))


def _forward(x, kernel, num_in):
  return _product(x, kernel, num_in), (x, kernel)


def _backward(num_in, residuals, grad):
  x, kernel = residuals
  num_out = kernel.ndim - num_in
  num_lead = x.ndim - num_in
  grad = grad.astype(x.dtype)
  # dx [*lead, *in] = dy [*lead, *out] . W [*in, *out] over the out dims.
  dx = jax.lax.dot_general(grad, kernel, ((tuple(range(num_lead, num_lead + num_out)),
                                           tuple(range(num_in, kernel.ndim))), ((), ())))
  lead = tuple(range(num_lead))

  def row_major(x, grad):  # dW = x^T dy: [*in, *lead] . [*lead, *out].
    x_t = _transposed_input(x, num_in)
    return jax.lax.dot_general(x_t, grad, ((tuple(range(num_in, x_t.ndim)), lead), ((), ())))

  def as_autodiff(x, grad):  # Contract the lead dims of both.
    return jax.lax.dot_general(x, grad, ((lead, lead), ((), ())))

  weight_grad = jax.lax.platform_dependent(x, grad, cpu=row_major, default=as_autodiff)
  return dx, weight_grad.astype(kernel.dtype)


dense_product.defvjp(_forward, _backward)
