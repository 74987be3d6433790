"""The objectives' losses as sums over a batch, so that micro-batches and devices add up exactly:
`sums(params, batch, rng, ref_params) -> (loss_sum, metric_sums)` and `count(batch)`, the divisor
of both (target tokens for the language-model loss, preference pairs for DPO). Which objective uses
which is llm_jax/train/objectives.py's registry.

- pretrain / sft: sum of weights * -log p(target); pretraining weighs every target 1, SFT only the
  assistant tokens (the batch's `weights`), and packed SFT rows carry `segments`. With optim.z_loss,
  training adds z_loss * log(Z)^2 per target (PaLM's z-loss; the train loss then includes it, and
  `z_loss` is logged on its own); evaluation never does.
- dpo: with sequence log-probs summed over response tokens, pi and ref for the chosen (c) and
  rejected (r) response, margin m = (pi_c - ref_c) - (pi_r - ref_r):
      sigmoid: -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)   (eps: label smoothing)
      ipo:     (m - 1 / (2 beta))^2
  plus, with dpo.chosen_nll = a > 0, a x the chosen response's mean token NLL (RPO), which keeps DPO
  from lowering the likelihood of the chosen answers while it widens the margin.
  Rewards are beta (pi - ref); reward accuracy is the share of pairs with chosen reward > rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.config import DPOConfig
from llm_jax.model.moe import router_terms
from llm_jax.model.transformer import Transformer

DPO_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logps_chosen", "logps_rejected")


def _hidden(model: Transformer, params, batch: dict, rng) -> tuple[jax.Array, dict | None]:
    """tokens [B, L+1] (+ segments [B, L+1]) -> final hidden states of the L inputs [B, L, D], and the MoE
    layers' router statistics (None for a dense model)."""
    segments = batch["segments"][:, :-1] if "segments" in batch else None
    rngs = {"dropout": rng} if rng is not None else None
    tokens = batch["tokens"][:, :-1]
    if not model.cfg.moe.experts:
        return model.apply({"params": params}, tokens, segments=segments, rngs=rngs)[0], None
    (hidden, _), state = model.apply(
        {"params": params}, tokens, segments=segments, rngs=rngs, mutable=["intermediates"]
    )
    return hidden, state["intermediates"]["moe"][0]


def lm_sums(model: Transformer, params, batch: dict, rng=None, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
    """(nll sum + the z-loss term + the MoE router losses per target, {"z_loss": that term} when z_loss > 0, and
    the router's metrics (model/moe.py router_terms), each times the targets)."""
    tokens = batch["tokens"]
    weights = batch.get("weights", jnp.ones(tokens[:, 1:].shape, jnp.float32))
    hidden, router = _hidden(model, params, batch, rng)
    loss, z_part = model.apply({"params": params}, hidden, tokens[:, 1:], weights, z_loss, method=Transformer.nll_sum)
    metrics = {"z_loss": z_part} if z_loss else {}
    if router is not None and model.train:  # sums like the rest: the step divides by the batch's targets
        count = lm_count(batch)
        term, router_metrics = router_terms(model.cfg, router)
        loss = loss + count * term
        metrics |= {k: count * v for k, v in router_metrics.items()}
        if model.cfg.moe.bias_update and model.train:  # [units, E] copies per expert: the step moves the biases
            metrics["moe_load"] = router["load"]
    return loss, metrics


def lm_count(batch: dict) -> jax.Array:
    if "weights" in batch:
        return jnp.sum(batch["weights"])
    tokens = batch["tokens"]
    return jnp.float32(tokens.shape[0] * (tokens.shape[1] - 1))


def sequence_logps(model: Transformer, params, tokens: jax.Array, weights: jax.Array, rng=None) -> jax.Array:
    """tokens [..., L+1], weights [..., L] -> sum of weights * log p(target) per sequence [...]."""
    lead = tokens.shape[:-1]
    flat = {"tokens": tokens.reshape(-1, tokens.shape[-1])}
    hidden, _ = _hidden(model, params, flat, rng)  # DPO leaves the router's losses out
    logps = model.apply({"params": params}, hidden, flat["tokens"][:, 1:], method=Transformer.token_logps)
    return jnp.sum(logps * weights.reshape(logps.shape), axis=-1).reshape(lead)


def dpo_loss(
    logps: jax.Array, ref_logps: jax.Array, cfg: DPOConfig, chosen_tokens: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """logps, ref_logps [B, 2] (chosen, rejected) -> per-pair loss [B], rewards [B, 2].
    With cfg.chosen_nll > 0, adds that weight x the chosen response's mean token NLL (chosen_tokens [B])."""
    rewards = cfg.beta * (logps - ref_logps)
    margin = (logps[:, 0] - ref_logps[:, 0]) - (logps[:, 1] - ref_logps[:, 1])
    if cfg.loss == "ipo":
        loss = (margin - 1 / (2 * cfg.beta)) ** 2
    else:
        eps, z = cfg.label_smoothing, cfg.beta * margin
        loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if cfg.chosen_nll:
        loss = loss - cfg.chosen_nll * logps[:, 0] / jnp.maximum(chosen_tokens, 1.0)
    return loss, rewards


def pair_mask(batch: dict) -> jax.Array:
    """[B] 1 for real pairs, 0 for the padding rows of an eval batch."""
    return (jnp.sum(batch["weights"][:, 0], axis=-1) > 0).astype(jnp.float32)


def dpo_sums(
    model: Transformer, ref_model: Transformer, cfg: DPOConfig, params, batch: dict, rng=None, ref_params=None
) -> tuple[jax.Array, dict]:
    """batch: tokens [B, 2, L+1], weights [B, 2, L], and ref_logps [B, 2] unless ref_params are given."""
    logps = sequence_logps(model, params, batch["tokens"], batch["weights"], rng)
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    else:
        ref = jax.lax.stop_gradient(sequence_logps(ref_model, ref_params, batch["tokens"], batch["weights"]))
    losses, rewards = dpo_loss(logps, ref, cfg, jnp.sum(batch["weights"][:, 0], axis=-1))
    mask = pair_mask(batch)
    per_pair = {
        "reward_accuracy": rewards[:, 0] > rewards[:, 1],
        "reward_margin": rewards[:, 0] - rewards[:, 1],
        "chosen_reward": rewards[:, 0],
        "rejected_reward": rewards[:, 1],
        "logps_chosen": logps[:, 0],
        "logps_rejected": logps[:, 1],
    }
    return jnp.sum(losses * mask), {k: jnp.sum(v * mask) for k, v in per_pair.items()}
