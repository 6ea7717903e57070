"""The one record of the export's tensor names agrees with the committed export, spelled out here
independently, as transformers.js and optimum name the onnx-community graphs."""

from __future__ import annotations

import onnx

from lumen_vlm.resources.export_names import EXPORT_NAMES

from .model_dirs import tiny_graph


def graph_io(graph: str) -> tuple[list[str], list[str]]:
    model = onnx.load(str(tiny_graph(graph)), load_external_data=False)
    return [value.name for value in model.graph.input], [value.name for value in model.graph.output]


def test_the_decoders_inputs_and_outputs_are_the_records_names() -> None:
    inputs, outputs = graph_io("decoder")
    layers = len([name for name in inputs if name.startswith("past_key_values.")]) // 2
    assert layers == 2  # the tiny model's
    assert inputs == [
        EXPORT_NAMES.inputs_embeds,
        EXPORT_NAMES.attention_mask,
        EXPORT_NAMES.position_ids,
        *(name for layer in range(layers) for name in EXPORT_NAMES.past(layer)),
    ]
    assert outputs == [EXPORT_NAMES.logits, *(name for layer in range(layers) for name in EXPORT_NAMES.present(layer))]
    assert EXPORT_NAMES.past(1) == ("past_key_values.1.key", "past_key_values.1.value")
    assert EXPORT_NAMES.present(1) == ("present.1.key", "present.1.value")
    assert (EXPORT_NAMES.inputs_embeds, EXPORT_NAMES.logits) == ("inputs_embeds", "logits")


def test_the_embedding_graph_takes_input_ids_and_gives_inputs_embeds() -> None:
    assert graph_io("embed") == ([EXPORT_NAMES.input_ids], [EXPORT_NAMES.inputs_embeds])
    assert EXPORT_NAMES.input_ids == "input_ids"


def test_past_layer_reads_the_layer_of_a_kv_input_only() -> None:
    assert EXPORT_NAMES.past_layer("past_key_values.12.value") == 12
    assert EXPORT_NAMES.past_layer("past_key_values.0.key") == 0
    for other in ("present.0.key", "past_key_values.0.query", "past_key_values.x.key", "inputs_embeds"):
        assert EXPORT_NAMES.past_layer(other) is None
