"""ONNX export and ONNX Runtime training.

* :mod:`~edgetrain.onnx.graphs`: how torch modules become ONNX graphs (one exporter, one
  opset, an exportable average pool), shared by everything below.
* :mod:`~edgetrain.onnx.export`: `edgetrain export`, the stitched network as one inference
  graph (or one per module), verified against torch.
* :mod:`~edgetrain.onnx.artifacts`: training artifacts of one module (training, optimizer and
  inference graphs, checkpoint) for `edgetrain fit --backend ort` and `edgetrain
  export-artifacts`.
* :mod:`~edgetrain.onnx.ort_training`: the per-module trainer behind `--backend ort`.
* :mod:`~edgetrain.onnx.schedule`: the learning rate ORT's momentum-free SGD gets per step.
* :mod:`~edgetrain.onnx.runtime`: the one place that checks whether onnxruntime-training is
  importable.

Export needs only `onnx` and `onnxruntime` (any build); training needs onnxruntime-training.
"""
