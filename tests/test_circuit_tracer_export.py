"""Circuits and transcoders exported in circuit-tracer's formats.

circuit-tracer is not a dependency (it pins transformers<=4.57.3), so nothing here imports it:
the structure is asserted field by field as circuit-tracer 0.5.0 defines and reads it, citing the
file of its source each check comes from. (The exports were also checked with circuit-tracer
itself, in a separate environment: see benchmarks/circuit_tracer_compare_ct.py.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.numpy import load_file

import sctranscoder as sct
from sctranscoder._circuit_tracer import (
    FEATURE_TYPES,
    cantor_pairing,
    check_graph_document,
    graph_document,
)
from sctranscoder._constants import NodeType
from sctranscoder.core.transcoder import Transcoder, TranscoderConfig

# circuit_tracer/frontend/graph_models.py: the pydantic models of the graph JSON, field -> type
# (optional fields have defaults there; every field is written here)
METADATA = {
    "slug": str,
    "scan": str,
    "transcoder_list": list,
    "prompt_tokens": list,
    "prompt": str,
    "node_threshold": (float, type(None)),
    "schema_version": (int, type(None)),
}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {
    "node_id": str,
    "feature": int,
    "layer": str,
    "ctx_idx": int,
    "feature_type": str,
    "token_prob": float,
    "is_target_logit": bool,
    "run_idx": int,
    "reverse_ctx_idx": int,
    "jsNodeId": str,
    "clerp": str,
    "influence": (float, type(None)),
    "activation": (float, type(None)),
}
LINK = {"source": str, "target": str, "weight": float}


def assert_fields(obj: dict, spec: dict) -> None:
    assert set(obj) == set(spec), set(obj) ^ set(spec)
    for name, types in spec.items():
        assert isinstance(obj[name], types), (name, obj[name])


@pytest.fixture(scope="module")
def traced(trained_base):
    """The shared transcoders with two circuits: towards a label and towards a feature."""
    adata = trained_base.copy()
    cell = adata.obs_names[3]
    sct.tl.trace_circuit(adata, cell=cell, target="CD14+ Monocyte", max_feature_nodes=32)
    sct.tl.trace_circuit(
        adata, cell=cell, target="L2F5", max_feature_nodes=16, key_added="feature_circuit"
    )
    return adata, cell


def test_graph_json_has_circuit_tracers_structure(traced, model, tmp_path):
    adata, cell = traced
    rec = adata.uns[f"circuit_{cell}"]
    file = sct.export_circuit_tracer_graph(adata, tmp_path, circuit=cell)
    assert file == tmp_path / f"circuit_{cell}.json"
    doc = json.loads(file.read_text())
    # circuit_tracer/frontend/graph_models.py::Model
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert_fields(doc["metadata"], METADATA)
    assert_fields(doc["qParams"], QPARAMS)
    meta = doc["metadata"]
    tokens = meta["prompt_tokens"]
    assert len(tokens) == rec["params"]["n_tokens"]
    assert meta["slug"] == f"circuit_{cell}"
    assert meta["scan"] == f"{sct.datasets.TINY_C2S_NAME}@{model.fingerprint}"
    assert meta["node_threshold"] == 1.0  # the frontend's slider maximum (index.html)
    # utils/create_graph_files.py::create_used_nodes_and_edges: one link per kept edge
    assert len(doc["nodes"]) == len(rec["nodes"])
    assert len(doc["links"]) == len(rec["edges"])
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(set(ids)) == len(ids)
    for link in doc["links"]:
        assert_fields(link, LINK)
        assert link["source"] in ids
        assert link["target"] in ids
    np.testing.assert_allclose(
        sorted(x["weight"] for x in doc["links"]), np.sort(rec["edges"]["weight"].to_numpy())
    )
    by_type: dict[str, list[dict]] = {}
    for node, (_, row) in zip(doc["nodes"], rec["nodes"].iterrows(), strict=True):
        assert_fields(node, NODE)
        by_type.setdefault(node["feature_type"], []).append(node)
        p = node["ctx_idx"]
        assert p == row["position"]
        assert tokens[p] == row["token"]
        assert (node["run_idx"], node["reverse_ctx_idx"]) == (0, 0)
        if row["type"] != "target":  # cumulative share of influence, as prune_graph's scores
            assert 0 < node["influence"] <= 1
    assert set(by_type) <= set(FEATURE_TYPES.values())
    # graph_models.py::Node.feature_node
    for n in by_type["cross layer transcoder"]:
        layer, feat, pos = map(int, n["node_id"].split("_"))
        assert n["layer"] == str(layer)
        assert n["ctx_idx"] == pos
        assert (
            n["feature"]
            == cantor_pairing(layer, feat)
            == (layer + feat) * (layer + feat + 1) // 2 + feat
        )
        assert n["jsNodeId"] == f"{layer}_{feat}-0"
        assert n["clerp"].startswith(f"L{layer}F{feat}")
        assert n["activation"] > 0
    # Node.error_node: "0_{layer}_{pos}"
    for n in by_type["mlp reconstruction error"]:
        zero, layer, pos = n["node_id"].removesuffix("_error").split("_")
        assert zero == "0"
        assert n["layer"] == layer
        assert n["ctx_idx"] == int(pos)
        assert n["feature"] == -1
        assert n["jsNodeId"] == f"{layer}_{pos}-0"
        assert n["activation"] is None
    # Node.token_node: "E_{vocab}_{pos}", layer "E", feature = pos
    for n in by_type["embedding"]:
        e, vocab, pos = n["node_id"].split("_")
        assert e == "E"
        assert n["layer"] == "E"
        assert n["feature"] == n["ctx_idx"] == int(pos)
        assert n["jsNodeId"] == f"E_{vocab}-{pos}"
        assert model.tokenizer.decode([int(vocab)]) == tokens[int(pos)]
    # Node.logit_node: layer n_layers + 1, the token id, the last position; the frontend
    # (attribution_graph/util-cg.js::formatData) parses the token between the first two '"'
    # and the probability after "(p=" of its clerp
    (logit,) = by_type["logit"]
    target = rec["params"]["target"]
    last = len(tokens) - 1
    assert logit["node_id"] == f"{model.n_layers + 1}_{target['token_id']}_{last}"
    assert logit["layer"] == str(model.n_layers + 1)
    assert logit["feature"] == target["token_id"]
    assert logit["jsNodeId"] == f"L_{target['token_id']}-{last}"
    assert logit["is_target_logit"]
    assert logit["influence"] is None
    assert logit["clerp"].split('"')[1] == target["token"]
    assert float(logit["clerp"].split("(p=")[1].split(")")[0]) == pytest.approx(
        logit["token_prob"], abs=5e-4
    )
    assert doc["qParams"]["clickedId"] == logit["node_id"]
    # the probability is the model's, on the whole teacher-forced prompt
    genes = adata.obs.loc[cell, "cell_sentence"].split()[: model.settings.n_genes]
    prefix = model.tokenizer(target["answer_prefix"], add_special_tokens=False)["input_ids"]
    ids = torch.cat([model.tokenize([genes]).input_ids[0], torch.tensor(prefix)])
    assert [model.tokenizer.decode([t]) for t in ids.tolist()] == tokens
    with torch.no_grad():
        probs = model.model(input_ids=ids[None]).logits[0, -1].softmax(-1)
    assert logit["token_prob"] == pytest.approx(float(probs[target["token_id"]]), rel=1e-4)
    # frontend/utils.py::add_graph_metadata: the served directory lists the graph
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index["graphs"] == [meta]
    check_graph_document(doc)


def test_feature_target_is_a_virtual_logit(traced, model, tmp_path):
    adata, _ = traced
    file = sct.export_circuit_tracer_graph(adata, tmp_path, circuit="feature_circuit", slug="feat")
    doc = json.loads(file.read_text())
    (logit,) = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    vocab = model.model.config.vocab_size  # attribution/targets.py: custom targets >= vocab_size
    assert logit["feature"] == vocab
    assert logit["token_prob"] == 1.0
    assert logit["clerp"].startswith('Output "L2F5" (p=1.000)')
    # a second graph joins the index; exporting again needs overwrite
    sct.export_circuit_tracer_graph(adata, tmp_path, circuit=adata.obs_names[3])
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == sorted(
        ["feat", f"circuit_{adata.obs_names[3]}"]
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        sct.export_circuit_tracer_graph(adata, tmp_path, circuit="feature_circuit", slug="feat")
    sct.export_circuit_tracer_graph(
        adata, tmp_path, circuit="feature_circuit", slug="feat", overwrite=True
    )
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert len(index["graphs"]) == 2


def test_graph_export_refuses_bad_input_and_writes_nothing(traced, tmp_path):
    adata, cell = traced
    with pytest.raises(ValueError, match="slug"):
        sct.export_circuit_tracer_graph(adata, tmp_path, circuit=cell, slug="a/b")
    with pytest.raises(ValueError, match="names a file"):
        sct.export_circuit_tracer_graph(adata, tmp_path / "graph.json", circuit=cell)
    with pytest.raises(KeyError, match="No circuit"):
        sct.export_circuit_tracer_graph(adata, tmp_path, circuit="nope")
    (tmp_path / "graph-metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sct.export_circuit_tracer_graph(adata, tmp_path, circuit=cell)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph-metadata.json"]
    # a sentence that changed since tracing is caught (the prompt is tokenised again)
    other = adata.copy()
    genes = other.obs.loc[cell, "cell_sentence"].split()
    other.obs.loc[cell, "cell_sentence"] = " ".join(genes[1:] + genes[:1])
    with pytest.raises(ValueError, match="trace it again"):
        sct.export_circuit_tracer_graph(other, tmp_path / "out", circuit=cell)
    assert not (tmp_path / "out").exists()


def _tiny_tables():
    """A hand-made circuit where circuit-tracer's error id "0_1_2" equals feature L0F1@2's."""
    nodes = pd.DataFrame(
        {
            "type": ["embedding", "feature", "error", "target"],
            "layer": [-1, 0, 1, 2],
            "position": [2, 2, 2, 2],
            "feature": [-1, 1, -1, -1],
            "token": ["c"] * 4,
            "gene": ["CD3E", "CD3E", "", ""],
            "activation": [1.0, 2.0, 0.5, 3.0],
            "influence": [0.5, 0.3, 0.2, 1.0],
        },
        index=["emb@2", "L0F1@2", "err L1@2", "target"],
    )
    edges = pd.DataFrame(
        {
            "source": ["emb@2", "L0F1@2", "err L1@2"],
            "target": ["L0F1@2", "target", "target"],
            "weight": [1.5, 2.0, -0.5],
        }
    )
    return nodes, edges


def test_graph_document_ids_influence_and_checks():
    nodes, edges = _tiny_tables()
    target = {"kind": "logit", "token_id": 7, "token": "x", "label": "T", "answer_prefix": ""}
    doc = graph_document(
        nodes,
        edges,
        token_ids=[3, 4, 5],
        tokens=["a", "b", "c"],
        n_layers=2,
        vocab_size=10,
        target=target,
        token_prob=0.25,
        slug="s",
        scan="m@f",
        prompt="abc",
        feature_labels={"L0F1": "T cells"},
    )
    check_graph_document(doc)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert ids == ["E_5_2", "0_1_2", "0_1_2_error", "3_7_2"]
    assert doc["nodes"][1]["clerp"] == "L0F1 (T cells) · CD3E"
    # cumulative share of influence: 0.5 / 1.0, then 0.8, then 1.0 (prune_graph's scores)
    assert [n["influence"] for n in doc["nodes"]] == pytest.approx([0.5, 0.8, 1.0, None])
    assert doc["links"][2] == {"source": "0_1_2_error", "target": "3_7_2", "weight": -0.5}
    # every kind of our nodes has a circuit-tracer feature type
    assert set(FEATURE_TYPES) == {t.label for t in NodeType}
    # the checks catch what circuit-tracer's models or frontend would reject
    broken = json.loads(json.dumps(doc))
    broken["links"][0]["target"] = "nowhere"
    broken["nodes"][3]["clerp"] = 'Output "x"'
    broken["nodes"][0]["layer"] = "0"
    del broken["qParams"]["sg_pos"]
    with pytest.raises(ValueError, match="Invalid circuit-tracer graph") as err:
        check_graph_document(broken)
    for problem in ("is not a node", "(p=", "has layer", "sg_pos"):
        assert problem in str(err.value)
    nan = json.loads(json.dumps(doc))
    nan["links"][0]["weight"] = math.nan
    with pytest.raises(ValueError, match="weight"):
        check_graph_document(nan)
    with pytest.raises(ValueError, match="missing from the node table"):
        graph_document(
            nodes,
            edges.assign(source=["x", "L0F1@2", "err L1@2"]),
            token_ids=[3, 4, 5],
            tokens=["a", "b", "c"],
            n_layers=2,
            vocab_size=10,
            target=target,
            token_prob=0.25,
            slug="s",
            scan="m",
            prompt="abc",
        )


def _relu_set(skip: bool) -> sct.TranscoderSet:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for la in range(3):
        tc = Transcoder(
            TranscoderConfig(d_in=16, d_out=16, n_features=40, activation="relu", skip=skip),
            generator=g,
        )
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.2, generator=g)
            tc.b_dec.normal_(0, 0.2, generator=g)
            if skip:
                tc.W_skip.normal_(0, 0.1, generator=g)
        layers[la] = tc
    return sct.TranscoderSet(
        layers, model={"name": "m", "fingerprint": "abc", "n_layers": 3, "architecture": "llama"}
    )


@pytest.mark.parametrize("skip", [False, True])
def test_exported_relu_transcoders_reproduce_ours(skip, tmp_path):
    tset = _relu_set(skip)
    out = sct.export_circuit_tracer_transcoders(tset, tmp_path / "ct", model_name="org/model")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "layer_0.safetensors",
        "layer_1.safetensors",
        "layer_2.safetensors",
    ]
    # utils/caching.py::load_transcoders_from_cache and utils/hf_utils.py::load_transcoders read
    # these keys
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["model_name"] == "org/model"
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "mlp.hook_out"
    assert config["scan"] == "m@abc"
    assert config["sctranscoder"]["activation"] == "relu"
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    for la in range(3):
        w = load_file(str(out / f"layer_{la}.safetensors"))
        # transcoder/single_layer_transcoder.py::load_relu_transcoder: d_sae from b_enc, d_model
        # from b_dec; no activation_function.threshold, so the activation is F.relu
        assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"W_skip"} if skip else set())
        assert w["W_enc"].shape == w["W_dec"].shape == (40, 16)
        assert w["W_enc"].dtype == np.float32
        assert w["b_enc"].shape == (40,)
        assert w["b_dec"].shape == (16,)
        # SingleLayerTranscoder.encode/decode: F.linear(x, W_enc, b_enc), acts @ W_dec + b_dec,
        # + x @ W_skip.T
        acts = np.maximum(x @ w["W_enc"].T + w["b_enc"], 0)
        y = acts @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if skip else 0)
        with torch.no_grad():
            ours_acts = tset[la].encode(torch.from_numpy(x)).numpy()
            ours_y = tset[la](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(acts, ours_acts, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y, ours_y, rtol=1e-5, atol=1e-5)
    # replaced only with overwrite, and only a directory of this kind
    with pytest.raises(FileExistsError, match="overwrite"):
        sct.export_circuit_tracer_transcoders(tset, out, model_name="org/model")
    sct.export_circuit_tracer_transcoders(tset, out, model_name="other", overwrite=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["model_name"] == "other"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a circuit-tracer"):
        sct.export_circuit_tracer_transcoders(
            tset, tmp_path / "mine", model_name="m", overwrite=True
        )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_topk_transcoders_need_allow_topk(trained_base, tmp_path):
    with pytest.raises(ValueError, match="allow_topk"):
        sct.export_circuit_tracer_transcoders(trained_base, tmp_path / "ct", model_name="m")
    assert not (tmp_path / "ct").exists()
    tset = sct.get.transcoders(trained_base)
    out = sct.export_circuit_tracer_transcoders(
        trained_base, tmp_path / "ct", model_name="m", allow_topk=True
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    extra = config["sctranscoder"]
    assert extra["activation"] == "topk"
    assert extra["k"] == [tset[la].config.k for la in tset]
    assert extra["model_fingerprint"] == tset.model["fingerprint"]
    # GPT-NeoX writes what its MLP module returns
    assert config["feature_output_hook"] == "mlp.hook_out"
    x = np.random.default_rng(2).normal(size=(6, tset[0].config.d_in)).astype(np.float32)
    for la in tset:
        w = load_file(str(out / f"layer_{la}.safetensors"))
        # what the docstring tells circuit-tracer users to set: Sequential(ReLU(), TopK(k))
        pre = np.maximum(x @ w["W_enc"].T + w["b_enc"], 0)
        keep = np.argsort(-pre, axis=1)[:, : extra["k"][la]]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, keep, np.take_along_axis(pre, keep, 1), 1)
        with torch.no_grad():
            ours = tset[la](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(acts @ w["W_dec"] + w["b_dec"], ours, rtol=1e-4, atol=1e-5)


def test_transcoder_export_refusals(tmp_path):
    tset = _relu_set(skip=False)
    with pytest.raises(ValueError, match="missing for layers \\[0\\]"):
        sct.export_circuit_tracer_transcoders(tset.subset([1, 2]), tmp_path / "a", model_name="m")
    with pytest.raises(ValueError, match="model_name"):
        sct.export_circuit_tracer_transcoders(tset, tmp_path / "a", model_name="")
    with pytest.raises(TypeError, match="TranscoderSet or an AnnData"):
        sct.export_circuit_tracer_transcoders({0: tset[0]}, tmp_path / "a", model_name="m")
    mixed = dict(tset.items())
    mixed[2] = _relu_set(skip=True)[2]
    with pytest.raises(ValueError, match="skip connection"):
        sct.export_circuit_tracer_transcoders(
            sct.TranscoderSet(mixed, model=tset.model), tmp_path / "a", model_name="m"
        )
    assert not any(tmp_path.iterdir())
    gemma = sct.TranscoderSet(dict(tset.items()), model={**tset.model, "architecture": "gemma2"})
    out = sct.export_circuit_tracer_transcoders(gemma, tmp_path / "g", model_name="m")
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["feature_output_hook"] == "hook_mlp_out"
    )
