"""Causal language models that read cell sentences: loading, identity, MLP layout, prediction.

Any Hugging Face causal LM works: given as an object, a local directory or a hub id. The families
of :mod:`.architectures` (GPT-NeoX as in C2S-Pythia, Llama/Mistral/Qwen2, Gemma-2 as in
C2S-Scale, GPT-2) are first-class: transcoders, activations and circuits; any other model whose
blocks have an ``mlp`` gets transcoders and activations. No AnnData here.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import family
from .sentences import PromptSettings
from .tokens import TokenizedPrompts, tokenize_prompts

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

#: The C2S model a user with network access most likely wants.
DEFAULT_C2S_MODEL = "vandijklab/C2S-Pythia-410m-cell-type-prediction"
#: File (next to ``config.json``) in which a model directory records its prompt settings.
SETTINGS_FILE = "sctranscoder.json"


@dataclass
class C2SModel:
    """A causal LM with its tokenizer and the prompt settings it expects.

    Attributes
    ----------
    model
        The Hugging Face causal LM (eval mode, gradients off).
    tokenizer
        Its fast tokenizer.
    settings
        Prompt settings (genes per sentence, template, organism).
    name
        Hub id, local path, or a name given by the user.
    labels
        Cell types the model was trained to answer, when known.
    info
        Free-form facts recorded with the model (training data, metrics).
    """

    model: nn.Module
    tokenizer: object
    settings: PromptSettings = field(default_factory=PromptSettings)
    name: str = "unnamed"
    labels: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (MLP layers)."""
        return len(mlp_modules(self.model))

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int | None:
        """Longest prompt the model reads, in tokens (None when unknown)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def fingerprint(self) -> str:
        """A hash of the config and weights that identifies this model."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def record(self) -> dict:
        """The model's identity as stored with transcoders: name, fingerprint, architecture,
        widths and prompt settings (strings, numbers and booleans only).
        """
        cfg = getattr(self.model, "config", None)
        return {
            "name": str(self.name),
            "fingerprint": self.fingerprint,
            "architecture": str(getattr(cfg, "model_type", type(self.model).__name__)),
            "n_layers": int(self.n_layers),
            "d_model": int(self.d_model),
            "family": str(family(self.model) or ""),
            "parallel_residual": bool(getattr(cfg, "use_parallel_residual", False)),
            "n_genes": int(self.settings.n_genes),
            "template": str(self.settings.template),
            "organism": str(self.settings.organism),
        }

    def tokenize(
        self, gene_lists: Sequence[Sequence[str]], *, gene_index: bool = True
    ) -> TokenizedPrompts:
        """Prompts for ``gene_lists``, tokenised, with the gene of each token (unless
        ``gene_index=False``: see :func:`~sctranscoder.core.tokens.tokenize_prompts`).
        """
        return tokenize_prompts(
            self.tokenizer,
            gene_lists,
            self.settings,
            max_length=self.max_length,
            gene_index=gene_index,
        )

    @torch.no_grad()
    def predict(
        self,
        gene_lists: Sequence[Sequence[str]],
        *,
        batch_size: int = 32,
        max_new_tokens: int = 24,
    ) -> list[str]:
        """Greedy answer (the cell type) for each gene list."""
        out: list[str] = []
        for start in range(0, len(gene_lists), batch_size):
            batch = self.tokenize(gene_lists[start : start + batch_size], gene_index=False)
            out.extend(greedy_answers(self, batch, max_new_tokens=max_new_tokens))
        return out

    @torch.no_grad()
    def answer_tokens(
        self,
        gene_lists: Sequence[Sequence[str]],
        *,
        batch_size: int = 32,
        max_new_tokens: int = 24,
        progress: bool = False,
    ) -> list[list[int]]:
        """Token ids of the greedy answer for each gene list (stop token included when reached):
        what the model says after each prompt, to be fed back teacher-forced.
        """
        out: list[list[int]] = []
        bar = tqdm(total=len(gene_lists), desc="answers", unit="cell", disable=not progress)
        try:
            for start in range(0, len(gene_lists), batch_size):
                batch = self.tokenize(gene_lists[start : start + batch_size], gene_index=False)
                out.extend(greedy_tokens(self, batch, max_new_tokens=max_new_tokens))
                bar.update(len(batch.lengths))
        finally:
            bar.close()
        return out


def _stop_ids(tokenizer) -> set[int]:
    stop = set()
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) == 1:
        stop.add(int(newline[0]))
    return stop


def greedy_answers(m: C2SModel, batch: TokenizedPrompts, *, max_new_tokens: int) -> list[str]:
    """Decode greedily after each prompt of a right-padded batch, until EOS or a newline.

    Prompts are left-aligned into a left-padded batch so all continue at the same position; the
    position ids follow each prompt's own length, so padding does not change the answer.
    """
    stop = _stop_ids(m.tokenizer)
    pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    answers = []
    for row in greedy_tokens(m, batch, max_new_tokens=max_new_tokens):
        end = next((i for i, t in enumerate(row) if t in stop or t == pad), len(row))
        answers.append(m.tokenizer.decode(row[:end]).strip())
    return answers


def greedy_tokens(m: C2SModel, batch: TokenizedPrompts, *, max_new_tokens: int) -> list[list[int]]:
    """The greedy answer's token ids after each prompt, its stop token (EOS or a newline)
    included when it was reached within ``max_new_tokens`` (see :func:`greedy_answers`).
    """
    device = m.device
    lengths = batch.lengths.tolist()
    n, longest = len(lengths), max(lengths)
    pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, longest), pad, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, longest - L :] = batch.input_ids[i, :L]
        mask[i, longest - L :] = 1
    ids, mask = ids.to(device), mask.to(device)
    stop = _stop_ids(m.tokenizer)
    cache_arg = _cache_argument(m.model)
    generated = torch.empty((n, 0), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    past = None
    cur_ids, cur_mask = ids, mask
    for _ in range(max_new_tokens):
        position_ids = (cur_mask.cumsum(-1) - 1).clamp(min=0)
        position_ids = position_ids[:, -cur_ids.shape[1] :]
        out = m.model(
            input_ids=cur_ids,
            attention_mask=cur_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_arg: past},
        )
        past = out.get("cache") if "cache" in out else out.get("past_key_values")
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, -1), nxt)
        generated = torch.cat([generated, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, torch.as_tensor(sorted(stop), device=device))
        if bool(done.all()):
            break
        cur_mask = torch.cat([cur_mask, torch.ones((n, 1), dtype=cur_mask.dtype, device=device)], 1)
        cur_ids = nxt.clamp_min(0)[:, None]
    answers = []
    for row in generated.tolist():
        toks = []
        for t in row:
            if t < 0:
                break
            toks.append(t)
            if t in stop:
                break
        answers.append(toks)
    return answers


def _cache_argument(model: nn.Module) -> str:
    """The keyword of the key/value cache: ``cache`` from transformers 5, else
    ``past_key_values`` (deprecated there, with a FutureWarning on every call).
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info messages inside our calls (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The MLP module of every transformer block, bottom to top.

    Supports GPT-NeoX/Pythia (``gpt_neox.layers[i].mlp``), GPT-2 (``transformer.h[i].mlp``) and
    Llama-family (``model.layers[i].mlp``) layouts, and any model whose blocks sit in one
    ``nn.ModuleList`` of modules with an ``mlp`` attribute. For all of these the MLP's input is the
    normalised residual stream (for GPT-NeoX, ``post_attention_layernorm`` of the layer input).
    """
    for path in ("gpt_neox.layers", "transformer.h", "model.layers", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and all(hasattr(b, "mlp") for b in obj):
            return [b.mlp for b in obj]
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(hasattr(b, "mlp") for b in mod):
            return [b.mlp for b in mod]
    raise ValueError(
        f"Could not find transformer blocks with an `mlp` in {type(model).__name__}; supported "
        "layouts are GPT-NeoX/Pythia, GPT-2 and Llama-family causal LMs."
    )


def model_fingerprint(model: nn.Module, *, sample: int = 65536) -> str:
    """Hash of the model's config and weights (a strided sample of each tensor, plus shapes).

    Sampling keeps this fast for large models while any retraining or change of architecture
    changes the hash.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        d = config.to_dict()
        for volatile in (
            "_name_or_path",
            "transformers_version",
            "torch_dtype",
            "dtype",
            "_attn_implementation_autoset",
            "_attn_implementation",
            "attn_implementation",
            "use_cache",
            "output_attentions",
            # set by save_pretrained: saving must not change the fingerprint
            "architectures",
        ):
            d.pop(volatile, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        vals = flat[::step].to("cpu", torch.float32).numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(np.ascontiguousarray(vals).tobytes())
    return h.hexdigest()[:16]


def random_like(model: C2SModel, *, seed: int = 0) -> C2SModel:
    """A copy of ``model`` with freshly, randomly initialised weights (same config and tokenizer).

    The chance baseline of interpretability (Hosokawa et al. 2025 ask how much of "X% of features
    are interpretable" a model that learned nothing would also reach): transcoders trained on this
    model see the same prompts and tokens, so any enrichment they show comes from the token
    embeddings of gene symbols, the architecture and the sentences, not from training.

    Parameters
    ----------
    model
        The trained model.
    seed
        Seed of the initialisation (the Hugging Face ``_init_weights`` of the architecture).
    """
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(model.model.config)
    finally:
        torch.random.set_rng_state(state)
    hf.to(device=model.device, dtype=next(model.model.parameters()).dtype)
    hf.eval()
    hf.requires_grad_(False)
    return C2SModel(
        model=hf,
        tokenizer=model.tokenizer,
        settings=model.settings,
        name=f"{model.name} (random init, seed {seed})",
        labels=list(model.labels),
        info={"random_init_of": str(model.name), "seed": int(seed)},
    )


#: Seconds to wait for the Hugging Face Hub to accept a connection before loading offline.
HUB_TIMEOUT = 3.0


def hub_cache() -> str:
    """The Hugging Face cache directory in use (``HF_HUB_CACHE``, ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline(repo_id: str) -> bool:
    """Whether hub id ``repo_id`` must be loaded from the local cache only.

    True when ``HF_HUB_OFFLINE`` is set, or when the model's ``config.json`` is cached and the
    hub does not accept a connection within :data:`HUB_TIMEOUT` seconds. Raises an ``OSError``
    at once (instead of after the hub client's retries) when it is neither cached nor reachable.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(
            try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache()), str
        )
    except ValueError:  # not a valid repo id: let the hub client say so
        return False
    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        host, port = (
            url.hostname or "huggingface.co",
            url.port or (80 if url.scheme == "http" else 443),
        )
        socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
    except OSError as err:
        if cached:
            logger.info(
                "the hub is unreachable (%s): loading %s from the local cache", err, repo_id
            )
            return True
        raise OSError(
            f"Could not load {repo_id!r}: it is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub ({constants.ENDPOINT}) cannot be reached "
            f"({err}). Without network, download the model elsewhere (`hf download {repo_id}`) "
            "and pass its directory, or use the embedded model: `sct.datasets.tiny_c2s()`."
        ) from None
    return False


def load_model(
    model: str | Path | nn.Module | C2SModel | None = None,
    *,
    tokenizer=None,
    settings: PromptSettings | dict | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> C2SModel:
    """Load a causal LM that reads cell sentences.

    Parameters
    ----------
    model
        A :class:`C2SModel`, a Hugging Face model object (pass ``tokenizer`` too), a local
        directory, or a hub id (default :data:`DEFAULT_C2S_MODEL`). A hub id is read from the
        Hugging Face cache when the hub is unreachable (or ``HF_HUB_OFFLINE=1``); when it is
        neither cached nor reachable, the error comes at once, not after the hub client's
        retries (:func:`hub_offline`).
        ``trust_remote_code`` is never enabled.
    tokenizer
        Tokenizer for a model object, or to override the one stored with the model.
    settings
        Prompt settings, as a :class:`PromptSettings` or a dict of its fields (``n_genes``,
        ``template``, ``organism``, ``answer_prefix``, ``extra``; other keys are refused).
        Default: those recorded with the model (``sctranscoder.json``) or the C2S defaults.
    device
        Where to hold the model: one of this machine's devices (``"cpu"``, ``"cuda:0"``,
        ``"mps"``; others are refused, naming those available). Default: CPU.
    dtype
        Floating-point precision (``torch.float16``, ``"bfloat16"``, ...), applied to model
        objects as to loaded ones. Default: the stored precision.
    name
        Name recorded with results, a non-empty str (default: the path or hub id).
    """
    from .._validate import check_device

    if not (model is None or isinstance(model, str | Path | nn.Module | C2SModel)):
        raise TypeError(
            "model must be a C2SModel, a Hugging Face model object, a model directory or a hub "
            f"id (str), got {type(model).__name__}."
        )
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty str (or None for the default), got {name!r}.")
    settings = _check_settings(settings)
    dtype = _check_dtype(dtype)
    device = check_device(device)
    to_dtype = dtype if isinstance(dtype, torch.dtype) else None  # "auto": as stored
    if isinstance(model, C2SModel):
        m = model
        if settings is not None:
            m.settings = settings
        if device is not None or to_dtype is not None:
            m.model.to(device=device, dtype=to_dtype)
        return m
    if model is None:
        model = DEFAULT_C2S_MODEL
    recorded: dict = {}
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("Pass `tokenizer=` together with a model object.")
        hf = model
        model_name = (
            name or getattr(getattr(hf, "config", None), "_name_or_path", "") or type(hf).__name__
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(model)
        local = Path(source).expanduser()
        is_local = local.is_dir()
        if not is_local and (local.exists() or source.startswith((".", "/", "~"))):
            raise FileNotFoundError(
                f"{source!r} is not a model directory. Pass a directory written by "
                "`save_pretrained`, a Hugging Face hub id, or use sct.datasets.tiny_c2s()."
            )
        if is_local and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"{source!r} holds no config.json, so it is no model directory. Pass a directory "
                "written by `save_pretrained` (config.json and weights), a Hugging Face hub id, "
                "or use sct.datasets.tiny_c2s()."
            )
        # a hub id: from the local cache when it is there, else only when the hub answers (the
        # hub client would otherwise spend ~23 s on retries before failing offline)
        offline = False if is_local else hub_offline(source)
        hub = {} if is_local else {"cache_dir": hub_cache(), "local_files_only": offline}
        try:
            with quiet_transformers():
                hf = AutoModelForCausalLM.from_pretrained(
                    str(local) if is_local else source,
                    trust_remote_code=False,
                    dtype=dtype,
                    **hub,
                )
                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(
                        str(local) if is_local else source,
                        trust_remote_code=False,
                        **hub,
                    )
        except OSError as err:
            if is_local:
                raise
            raise OSError(
                f"Could not load {source!r} from the Hugging Face Hub or the local cache ({err}). "
                "Without network, download the model elsewhere and pass its directory, or use the "
                "embedded model: `sct.datasets.tiny_c2s()`."
            ) from err
        model_name = name or (str(local.resolve()) if is_local else source)
        if is_local and (local / SETTINGS_FILE).exists():
            recorded = json.loads((local / SETTINGS_FILE).read_text())
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("A fast tokenizer is needed (it gives the character offsets of tokens).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if settings is None:
        settings = PromptSettings.from_dict(recorded.get("prompt", {}))
    hf.eval()
    hf.requires_grad_(False)
    if device is not None or to_dtype is not None:
        hf.to(device=device, dtype=to_dtype)
    mlp_modules(hf)  # fail early on an unsupported layout
    return C2SModel(
        model=hf,
        tokenizer=tokenizer,
        settings=settings,
        name=model_name,
        labels=list(recorded.get("labels", [])),
        info=dict(recorded.get("info", {})),
    )


def _check_settings(settings: object) -> PromptSettings | None:
    """``settings`` of :func:`load_model` as :class:`PromptSettings` (``None`` stays ``None``)."""
    if settings is None or isinstance(settings, PromptSettings):
        return settings
    if not isinstance(settings, dict):
        raise TypeError(
            "settings must be a PromptSettings or a dict of its fields, got "
            f"{type(settings).__name__}."
        )
    known = [f.name for f in fields(PromptSettings)]
    unknown = sorted(set(settings) - set(known), key=str)
    if unknown:
        raise ValueError(f"Unknown prompt setting(s) {unknown}: PromptSettings has {known}.")
    return PromptSettings.from_dict(settings)


def _check_dtype(dtype: object) -> torch.dtype | str | None:
    """``dtype`` of :func:`load_model` as a floating-point torch dtype (``"auto"`` is kept)."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return dtype
    value = dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch dtype such as torch.float16, 'bfloat16' or "
            f"'float32', got {dtype!r}."
        )
    return value
