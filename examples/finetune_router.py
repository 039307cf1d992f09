"""Fine-tune a MoE block's router and biases with the MXFP4 experts frozen (Flax NNX + optax).

    pip install "jax_mxfp4_moe[flax]"
    python examples/finetune_router.py            # CPU: a few seconds

A teacher block and a student share the same MXFP4 experts; the student's
router and biases start elsewhere.  The student learns to reproduce the
teacher's outputs: gradients reach the router through the top-k routing
weights (softmax over the selected logits, differentiable in ``moe``) and
reach b1 and b2 directly; the experts are ``MXFP4Experts`` variables, not
``nnx.Param``, so the optimizer (``wrt=nnx.Param``) leaves them alone.
Prints the loss per step; exit status 1 if it did not go down.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_mxfp4_moe.nnx import MoE


def make_problem(*, experts=8, top_k=2, hidden=64, intermediate=64, tokens=64, seed=0,
                 quant="a16w4", router="gpt-oss"):
    """(teacher, student, x, target): the student holds the teacher's experts."""
    kw = dict(activation="swiglu_oai", quant=quant)
    if router == "deepseek-v3":
        kw.update(router="deepseek-v3", num_groups=4, topk_groups=2)
    teacher = MoE.random(experts, top_k, hidden, intermediate, rngs=nnx.Rngs(seed), **kw)
    rng = np.random.default_rng(seed + 1)
    # the teacher's router, perturbed; biases zero
    student_router = np.asarray(teacher.router_weight.get_value()) + 0.5 * rng.standard_normal(
        (experts, hidden)) / np.sqrt(hidden)
    w = teacher.weights
    w = type(w)(w.w1, w.w1_scale, w.w2, w.w2_scale, jnp.zeros_like(w.b1), jnp.zeros_like(w.b2),
                **{f: getattr(w, f) for f in ("num_experts", "hidden", "intermediate", "gate_up",
                                              "layout", "scale_max")})
    student = MoE(w, top_k=top_k, router_weight=student_router, **kw)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    return teacher, student, x, teacher(x)


def loss_fn(model, x, target):
    return jnp.mean((model(x).astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def train(student, x, target, *, steps=40, learning_rate=3e-2, log=print):
    """Adam on the student's nnx.Param (router weight and bias, b1, b2); the
    loss before each step and after the last."""
    optimizer = nnx.Optimizer(student, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, target)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(steps):
        losses.append(float(step(student, optimizer, x, target)))
        if i % 10 == 0:
            log(f"step {i:3d}  loss {losses[-1]:.5f}")
    losses.append(float(loss_fn(student, x, target)))
    log(f"final     loss {losses[-1]:.5f} (from {losses[0]:.5f})")
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quant", default="a16w4", choices=["a16w4", "a8w4", "a4w4"])
    ap.add_argument("--router", default="gpt-oss", choices=["gpt-oss", "deepseek-v3"])
    a = ap.parse_args(argv)
    teacher, student, x, target = make_problem(quant=a.quant, router=a.router)
    experts_before = np.asarray(student.w1.get_value())
    losses = train(student, x, target, steps=a.steps)
    assert np.array_equal(experts_before, np.asarray(student.w1.get_value())), "experts changed"
    print(f"{jax.devices()[0].platform}: loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    return 0 if losses[-1] < 0.5 * losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
