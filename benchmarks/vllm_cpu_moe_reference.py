"""A reference expert kernel for vLLM's CPU build, standing in for the one piece it lacks: a fused-MoE
backend for these quantized experts (vLLM 0.32 CPU: fp8 W8A8 stops at `Unsupported FP8 MoE backend: NONE`,
int8 W8A8 at `No Int8 MoE backend …`, w4a16 at `No WNA16 MoE backend supports the deployment configuration`;
its CPU kernels for quantized experts take SiLU experts only, Gemma 4's are gelu-tanh).

Imported by bench_gemma4_vllm.py's vLLM child process only, with `--cpu-moe-reference`; never by
gemmaquant. Everything else stays vLLM's own: its config parsing, the gemma4 loader mapping our
per-expert names onto its fused `w13`/`w2` parameters, the compressed-tensors MoE method's weight
loaders and post-processing, its router, its dense Linears and attention. What is substituted:

* fp8 (`CompressedTensorsW8A8Fp8MoEMethod`): `select_fp8_moe_backend`, when it finds no backend on
  CPU, returns vLLM's `EMULATION` backend (its weight conversion leaves w13/w2 and their scales as
  loaded) with `ReferenceFp8Experts`, which computes what the GPU W8A8 kernels compute, on the
  parameters as vLLM stores them after loading: each GEMM input quantized per token (or with the
  static input scale) by vLLM's own `QuantFP8` (the op its CPU fp8 Linears use; `scaled_fp8_quant`,
  which the GPU MoE path calls, has no CPU kernel), FP8 codes multiplied and summed in float32,
  scaled by the token scale and the weight's channel (or tensor) scale; vLLM's `apply_moe_activation`
  between the GEMMs; the routing weights applied to each expert's output, summed over the top-k.
* int8 W8A8 (`CompressedTensorsW8A8Int8MoEMethod`): where `select_int8_moe_backend` finds nothing,
  its `TRITON` branch (no layout change; there is no INT8 emulation backend) with `ReferenceInt8Experts`:
  each GEMM input quantized per token by vLLM's `scaled_int8_quant` (the GPU MoE path's own quantizer,
  which has a CPU kernel), int8 codes multiplied and summed in int32, scaled by token × channel scale.
* w4a16 (`CompressedTensorsWNA16MoEMethod`): vLLM's own `EMULATION` backend, which unpacks and
  dequantizes the int4 experts to bf16 at load time (`_process_weights_emulation_gptq`) and then
  runs `TritonExperts` — GPU only. The CPU priority list gets `EMULATION` appended, and its experts
  class becomes `ReferenceWNA16Experts`: the same float GEMMs on vLLM's dequantized weights.

No file is re-read here: the kernels only see what vLLM loaded. `report()` says how many MoE layers
were built with the substitute and how often it ran, so a row that claims it ran can be checked.
"""

from __future__ import annotations

import torch

USED = {"layers": 0, "calls": 0, "backend": set(), "dump": None, "weights": []}


class PatchError(RuntimeError):
    pass


def _kernel_classes():
    import vllm._custom_ops as ops
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation, apply_moe_activation
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        GroupShape, kFp8DynamicTokenSym, kFp8StaticChannelSym, kFp8StaticTensorSym, kInt4Static,
        kInt4Static32, kInt4Static32Asym, kInt4StaticAsym, kInt8DynamicTokenSym, kInt8StaticChannelSym)
    from vllm.platforms import current_platform

    class _Reference(mk.FusedMoEExpertsModular):
        """Token-by-expert loop in torch over w1 [E, 2I, H] / w2 [E, H, I] as vLLM stores them."""

        def __init__(self, moe_config, quant_config):
            super().__init__(moe_config, quant_config)
            USED["layers"] += 1
            USED["backend"].add(type(self).__name__)
            self.index = USED["layers"] - 1  # layers are built in order

        @property
        def expects_unquantized_inputs(self) -> bool:
            return True  # the activation rounding happens in apply(), with vLLM's QuantFP8

        @staticmethod
        def activation_format():
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device() -> bool:
            return current_platform.is_cpu()

        @staticmethod
        def _supports_no_act_and_mul() -> bool:
            return False

        @staticmethod
        def _supports_activation(activation) -> bool:
            return activation in (MoEActivation.SILU, MoEActivation.GELU, MoEActivation.GELU_TANH)

        @staticmethod
        def _supports_parallel_config(moe_parallel_config) -> bool:
            return moe_parallel_config.ep_size == 1 and moe_parallel_config.dp_size == 1

        @staticmethod
        def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
            return True  # routing happens before the experts (vLLM's router), not here

        @staticmethod
        def _supports_router_logits_dtype(router_logits_dtype, routing_method) -> bool:
            return True

        def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta,
                             activation):
            return (0,), (0,), (M, K)  # apply() writes the reduced output itself, as CPU's experts do

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceNoOP()

        def gemm(self, x, w, which: str, e: int):
            return x @ w.to(x.dtype).t()

        def dequantized(self, w, which: str):
            """All experts' weights [E, N, K] in float32, as this kernel reads them."""
            return w.float()

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                  apply_router_weight_on_input):
            try:
                USED["calls"] += 1
                if USED["dump"] is not None and len(USED["weights"]) == self.index:
                    held = str(w1.dtype if w1.element_size() >= 2 else torch.float32).replace("torch.", "")
                    USED["weights"].append((self.dequantized(w1, "w1"), self.dequantized(w2, "w2"), held))
                x = hidden_states
                acc = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
                for e in topk_ids.unique().tolist():
                    le = e if expert_map is None else int(expert_map[e])
                    if le < 0:
                        continue
                    tok, slot = (topk_ids == e).nonzero(as_tuple=True)
                    h = self.gemm(x[tok], w1[le], "w1", le)
                    a = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype, device=h.device)
                    apply_moe_activation(activation, a, h.contiguous())
                    y = self.gemm(a, w2[le], "w2", le).float()
                    if not apply_router_weight_on_input:  # else prepare() already scaled the input
                        y = y * topk_weights[tok, slot, None].float()
                    acc.index_add_(0, tok, y)
                output.copy_(acc.to(output.dtype))
            except Exception as err:
                raise RuntimeError(f"--cpu-moe-reference: the reference expert kernel failed "
                                   f"({type(self).__name__}, w1 {tuple(w1.shape)} {w1.dtype}): {err}") from err

    class ReferenceFp8Experts(_Reference):
        """W8A8 FP8 experts: per-channel or per-tensor weight scales, dynamic per-token or static input
        scales (the two compressed-tensors MoE layouts vLLM accepts). The static per-tensor layout has not
        run: our fp8-static output stops earlier, at a dense Linear vLLM's CPU build cannot requantize."""

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return (weight_key, activation_key) in ((kFp8StaticChannelSym, kFp8DynamicTokenSym),
                                                    (kFp8StaticTensorSym, kFp8StaticTensorSym))

        def __init__(self, moe_config, quant_config):
            super().__init__(moe_config, quant_config)
            static = quant_config.a1_scale is not None
            self.quant = QuantFP8(static=static, group_shape=GroupShape.PER_TENSOR if static else GroupShape.PER_TOKEN)

        def weight_scale(self, which, e):
            """Expert e's scale as a row [N] (per channel) or [1] (per tensor), as vLLM stores it."""
            ws = self.quant_config.w1_scale if which == "w1" else self.quant_config.w2_scale
            return ws[e].float().reshape(-1) if ws.numel() > ws.shape[0] else ws.float().reshape(-1)[e:e + 1]

        def dequantized(self, w, which):
            return torch.stack([w[e].float() * self.weight_scale(which, e).reshape(-1, 1) for e in range(w.shape[0])])

        def gemm(self, x, w, which, e):
            if w.dtype != torch.float8_e4m3fn:
                raise TypeError(f"expected float8_e4m3fn experts, got {w.dtype}")
            ws = self.weight_scale(which, e)
            a_scale = self.quant_config.a1_scale if which == "w1" else self.quant_config.a2_scale
            if a_scale is not None:
                a_scale = a_scale.float().reshape(-1)
                a_scale = a_scale[e:e + 1] if a_scale.numel() > 1 else a_scale
            xq, xs = self.quant.forward_native(x, a_scale)
            y = (xq.float() @ w.float().t()) * xs.float().reshape(-1, 1) * ws.reshape(1, -1)
            return y.to(x.dtype)

    class ReferenceInt8Experts(_Reference):
        """W8A8 INT8 experts (per-channel weight scales, dynamic symmetric per-token input scales, the one
        layout vLLM's compressed-tensors INT8 MoE method accepts)."""

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            return (weight_key, activation_key) == (kInt8StaticChannelSym, kInt8DynamicTokenSym)

        def weight_scale(self, which, e):
            ws = self.quant_config.w1_scale if which == "w1" else self.quant_config.w2_scale
            return ws[e].float().reshape(-1)

        def dequantized(self, w, which):
            return torch.stack([w[e].float() * self.weight_scale(which, e).reshape(-1, 1) for e in range(w.shape[0])])

        def gemm(self, x, w, which, e):
            if w.dtype != torch.int8:
                raise TypeError(f"expected int8 experts, got {w.dtype}")
            # vLLM's own per-token int8 quantizer (the GPU MoE path's, which has a CPU kernel); int32 sums
            xq, xs, _ = ops.scaled_int8_quant(x.contiguous(), None, None, True)
            acc = xq.to(torch.int32) @ w.to(torch.int32).t()
            return (acc.float() * xs.float().reshape(-1, 1) * self.weight_scale(which, e).reshape(1, -1)).to(x.dtype)

    class ReferenceWNA16Experts(_Reference):
        """Int4 weight-only experts, already dequantized to bf16 by vLLM's EMULATION conversion."""

        def __init__(self, moe_config, quant_config):
            super().__init__(moe_config, quant_config)
            # as vLLM's Int4EmulationTritonExperts: the weights reach apply() as plain floats
            self.quant_config._w1.dtype = self.quant_config._w2.dtype = None
            self.quant_config._w1.scale = self.quant_config._w2.scale = None

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key) -> bool:
            int4 = (kInt4Static, kInt4Static32, kInt4StaticAsym, kInt4Static32Asym)
            return weight_key in int4 and activation_key is None

        def gemm(self, x, w, which, e):
            if w.element_size() < 2:
                raise TypeError(f"expected weights dequantized by vLLM's EMULATION conversion, got {w.dtype}")
            return x @ w.to(x.dtype).t()

    return ReferenceFp8Experts, ReferenceInt8Experts, ReferenceWNA16Experts


def _need(module, name: str):
    if not hasattr(module, name):
        import vllm

        raise PatchError(f"--cpu-moe-reference: vLLM {vllm.__version__} has no {module.__name__}.{name}; "
                         "the patch is written against vLLM 0.32's fused-MoE oracles")
    return getattr(module, name)


def install(dump: str | None = None) -> None:
    """Patch the three backend selections (call before building the LLM; the engine must run in this
    process: VLLM_ENABLE_V1_MULTIPROCESSING=0). dump: a path where `report()` saves each MoE layer's
    (w13, w2, dtype) as the kernel read them, as float32 (dtype: the precision of the values it multiplies:
    float32 for FP8 codes × scales, bfloat16 for vLLM's emulation-dequantized int4), for a comparison
    outside vLLM."""
    import importlib

    import vllm

    def need_module(name: str):
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise PatchError(f"--cpu-moe-reference: vLLM {vllm.__version__} has no module {name} ({err}); "
                             "the patch is written against vLLM 0.32's fused-MoE oracles") from err

    layers = "vllm.model_executor.layers."
    emu = need_module(layers + "fused_moe.experts.int4_emulation_moe")
    ofp8 = need_module(layers + "fused_moe.oracle.fp8")
    owna16 = need_module(layers + "fused_moe.oracle.int_wna16")
    ctfp8 = need_module(layers + "quantization.compressed_tensors.compressed_tensors_moe."
                                 "compressed_tensors_moe_w8a8_fp8")
    ctint8 = need_module(layers + "quantization.compressed_tensors.compressed_tensors_moe."
                                  "compressed_tensors_moe_w8a8_int8")
    oint8 = need_module(layers + "fused_moe.oracle.int8")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise PatchError("--cpu-moe-reference is for vLLM's CPU build (it stands in for a missing CPU kernel)")
    # every name first, so that a vLLM without one is refused before anything is patched
    select_fp8 = _need(ctfp8, "select_fp8_moe_backend")
    backend = _need(ofp8, "Fp8MoeBackend")
    _need(backend, "EMULATION"), _need(backend, "NONE")
    wna16 = _need(owna16, "WNA16MoEBackend")
    _need(wna16, "EMULATION")
    _need(emu, "Int4EmulationTritonExperts")
    priority = _need(owna16, "_get_priority_backends")
    select_int8 = _need(ctint8, "select_int8_moe_backend")
    int8_backend = _need(oint8, "Int8MoeBackend")
    _need(int8_backend, "TRITON")
    try:
        fp8_experts, int8_experts, wna16_experts = _kernel_classes()
    except ImportError as err:
        raise PatchError(f"--cpu-moe-reference: vLLM {vllm.__version__} lacks a name the reference kernel "
                         f"uses ({err})") from err
    USED["dump"] = dump

    def select_fp8_moe_backend(config, weight_key, activation_key, allow_vllm_cutlass=False):
        chosen, cls = select_fp8(config=config, weight_key=weight_key, activation_key=activation_key,
                                 allow_vllm_cutlass=allow_vllm_cutlass)
        if chosen != backend.NONE:
            return chosen, cls
        if not fp8_experts._supports_quant_scheme(weight_key, activation_key):
            raise PatchError(f"--cpu-moe-reference: no reference FP8 expert kernel for weights {weight_key} "
                             f"× activations {activation_key}")
        return backend.EMULATION, fp8_experts

    def select_int8_moe_backend(config, weight_key, activation_key):
        try:
            return select_int8(config=config, weight_key=weight_key, activation_key=activation_key)
        except NotImplementedError:
            if not int8_experts._supports_quant_scheme(weight_key, activation_key):
                raise
        # TRITON: the conversion that leaves w13/w2 as loaded (there is no INT8 EMULATION backend)
        return int8_backend.TRITON, int8_experts

    def _get_priority_backends():
        return [*priority(), wna16.EMULATION]  # CPU: ZEN_CPU, CPU, then vLLM's dequantize-at-load emulation

    ctfp8.select_fp8_moe_backend = select_fp8_moe_backend
    ctint8.select_int8_moe_backend = select_int8_moe_backend
    owna16._get_priority_backends = _get_priority_backends
    # make_wna16_moe_kernel and backend_to_kernel_cls import this name when they run
    emu.Int4EmulationTritonExperts = wna16_experts


def report() -> dict:
    """MoE layers built with a reference kernel, how often one ran, and which (and the dump, if asked)."""
    if USED["dump"] is not None and USED["weights"]:
        torch.save(USED["weights"], USED["dump"])
    return {"layers": USED["layers"], "calls": USED["calls"], "kernels": sorted(USED["backend"])}
