"""Quantized attention: activation quantizers on q, k, v and the softmax output.

The processor replaces diffusers' AttnProcessor on every `Attention` module.
q, k and v follow the bit choice of the projection that produces them
(to_q / to_k / to_v), so a policy over Conv2d/Linear layers covers the
attention matmuls too; the softmax output has its own fixed bits (default 16).
With `bos_aware`, the BOS token's K/V of cross-attention stay in full
precision (MixDQ): CLIP's causal encoder makes that token's embedding the
same for every prompt, and its outliers would otherwise set the ranges."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant.config import QuantConfig
from pipeline.quant.layers import ActQuantBank, QuantContext, QuantLayer, fp32_math, mix_options

FINE_BITS = 16  # grids this fine or finer are what a deployed UNet may leave out (fine_grids="drop")
CHUNK_ELEMENTS = 1 << 16  # attention-matrix elements per head and sample in an inference block (256 KiB in fp32)


class QuantAttnProcessor(nn.Module):
    def __init__(self, config: QuantConfig, ctx: QuantContext):
        super().__init__()
        slots = config.bank_steps
        self.q = ActQuantBank(config.a_bit_options, slots, config.act_samples)
        self.k = ActQuantBank(config.a_bit_options, slots, config.act_samples)
        self.v = ActQuantBank(config.a_bit_options, slots, config.act_samples)
        self.softmax = ActQuantBank([config.softmax_bits], slots, config.act_samples)
        self.bos_aware = config.bos_aware
        self.time_aware = config.time_aware
        self.ctx = ctx
        self.enabled = True
        # a deployed UNet loaded with fine_grids="drop" (pipeline/deploy) sets this: grids of >= FINE_BITS on
        # q, k, v and the softmax are left out, so attention runs as the fused float kernel (SDPA)
        self.drop_fine_grids = False

    def softmax_quantized(self) -> bool:
        """Whether the softmax output is fake-quantized (or observed): only then is the attention
        matrix materialized; otherwise the fused kernel computes the same attention."""
        bits = self.softmax.bit_options[0]
        if self.drop_fine_grids and bits >= FINE_BITS and not self.softmax.observing:
            return False
        return self.enabled and (self.softmax.observing or bits < 32)

    def banks(self) -> list[ActQuantBank]:
        return [self.q, self.k, self.v, self.softmax]

    def _quant(self, bank: ActQuantBank, x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        if not self.enabled:
            return x
        slot = min(self.ctx.step, bank.n_slots - 1) if self.time_aware else 0
        if getattr(proj, "mixture", None) is not None:  # Q2B training: follow the projection's relaxed choice
            return mix_options(lambda k: bank(x, k, slot), *proj.mixture, like=x)
        k = proj.bit_index() if isinstance(proj, QuantLayer) else bank.bit_options.index(max(bank.bit_options))
        if self.drop_fine_grids and bank.bit_options[k] >= FINE_BITS and not bank.observing:
            return x
        return bank(x, k, slot)

    def _project_kv(self, attn, proj: nn.Module, bank: ActQuantBank, enc: torch.Tensor, cross: bool) -> torch.Tensor:
        if not (self.bos_aware and cross and isinstance(proj, QuantLayer)):
            return self._quant(bank, proj(enc), proj)
        bos = proj.fp_forward(enc[:, :1])  # full precision, prompt-independent
        rest = self._quant(bank, proj(enc[:, 1:]), proj)
        return torch.cat([bos, rest], dim=1)

    def _gridded_attention(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        """softmax(q k^T) on the softmax bank's grid, times v. At inference the matrix is built a block of
        query rows at a time (CHUNK_ELEMENTS per head and sample), so the block stays in cache and SD's 512 px
        self-attention never holds its 1 GB matrix. The block's rows depend on the key length only, not on the
        batch. BLAS may round a block's last bit differently from the whole matrix; the fake-quant and the
        deployed UNet share this code, so they agree with each other. Calibration (observing), training
        (autograd) and masked attention build it whole."""
        slot = min(self.ctx.step, self.softmax.n_slots - 1) if self.time_aware else 0
        rows = query.shape[1]
        step = max(1, CHUNK_ELEMENTS // key.shape[1])
        if self.softmax.observing or torch.is_grad_enabled() or step >= rows or attention_mask is not None:
            probs = self.softmax(attn.get_attention_scores(query, key, attention_mask), 0, slot, inplace=True)
            return torch.bmm(probs, value)
        out = query.new_empty(query.shape[0], rows, value.shape[-1])
        for a in range(0, rows, step):
            probs = attn.get_attention_scores(query[:, a:a + step], key, None)
            torch.bmm(self.softmax(probs, 0, slot, inplace=True), value, out=out[:, a:a + step])
        return out

    @fp32_math
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._quant(self.q, attn.to_q(hidden_states), attn.to_q)
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._project_kv(attn, attn.to_k, self.k, encoder_hidden_states, cross)
        value = self._project_kv(attn, attn.to_v, self.v, encoder_hidden_states, cross)

        if self.softmax_quantized():
            query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
            hidden_states = attn.batch_to_head_dim(self._gridded_attention(attn, query, key, value, attention_mask))
        else:  # nothing touches the probabilities: the fused kernel, as diffusers' AttnProcessor2_0
            query, key, value = (attn.head_to_batch_dim(t, out_dim=4) for t in (query, key, value))
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
            hidden_states = hidden_states.transpose(1, 2).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
