"""One `edgetrain profile` measurement, run in a fresh subprocess so its peak is its own.

    python -m edgetrain.memory.worker '<json spec>'   ->  one JSON line on stdout

Phases, each measured apart:

1. framework: Python + torch imported, one tiny conv trained one step (loads the CPU kernels
   and autograd); nothing of the model exists. Resident memory after it is the framework
   baseline.
2. data: the training set loaded (uint8 tensors in memory).
3. training: ``steps`` real training steps of the variant; the meter is reset before each
   module (sequential) or before the whole variant.

``training-only`` = peak of (3) minus resident memory after (2). The analytic floor is computed
afterwards, outside the measured phase.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from edgetrain.memory import allocator
from edgetrain.memory.breakdown import (
    count_saved_activations,
    greedy_step_cost,
    network_step_cost,
    parameter_bytes,
    trainable_bytes,
)
from edgetrain.memory.meter import MemoryMeter, current_rss_bytes, release_free_memory
from edgetrain.training.sgd import SGD


def warm_up() -> None:
    conv = torch.nn.Conv2d(1, 2, 3)
    opt = SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()


def main(spec: dict) -> dict:
    device = torch.device(spec.get("device", "cpu"))
    # The policy `edgetrain fit` runs under for this method and mode.
    alloc = allocator.apply(device.type, None if spec["method"].startswith("e2e") else
                            spec["mode"], spec["method"] == "e2e-ckpt")
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    meter = MemoryMeter(device)
    warm_up()
    release_free_memory(device)
    framework = current_rss_bytes()

    from edgetrain.data import augment_batch, iterate_batches, load_dataset, normalize
    from edgetrain.models.families import network_spec
    from edgetrain.models.network import (
        build_head,
        build_module,
        build_network,
        set_checkpointing,
        set_transport_form,
    )
    from edgetrain.models.split import split_network
    from edgetrain.training.steps import greedy_step
    from edgetrain.training.transport import tau_schedule

    data = load_dataset(spec["dataset"], spec.get("data_dir"), False, None,
                        spec.get("train_limit"), None, 0)
    info = data.info
    if spec["batch_size"] > len(data.train):
        from edgetrain.errors import UserInputError

        raise UserInputError(f"--batch-size {spec['batch_size']} is larger than the training set "
                             f"({len(data.train)} images); use at most {len(data.train)}.")
    release_free_memory(device)
    with_data = current_rss_bytes()
    net_spec = network_spec(spec["model"], info.in_channels, info.image_size,
                            tuple(spec["widths"]))
    plans = split_network(net_spec, spec["modules"], info.image_size, spec["split"])
    b, steps, method = spec["batch_size"], spec["steps"], spec["method"]
    taus = (tau_schedule(spec["tau"], len(plans)) if method == "trgl"
            else [float("inf")] * len(plans))
    form = spec.get("transport_form", "bn")
    generator = torch.Generator().manual_seed(0)

    def real_batches():
        while True:
            for images, labels in iterate_batches(data.train, b, True, generator, True):
                images = augment_batch(images.to(device), info.crop_padding, info.hflip,
                                       generator)
                yield normalize(images, info), labels.to(device)

    batches = real_batches()
    step_times: list[float] = []
    module_step_times: list[float] = []  # sequential: one median per module

    def timed(fn) -> None:
        step_times.clear()
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - start)

    peaks: list[int] = []
    floor: dict
    if method in ("e2e", "e2e-ckpt"):
        meter.reset()
        network = build_network(net_spec, plans, info.num_classes).to(device)
        set_checkpointing(network, method == "e2e-ckpt")
        opt = SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(network(x), y).backward()
            opt.step()

        timed(step)
        peaks.append(meter.read().peak_bytes)
        x, y = next(batches)
        cost = network_step_cost(network, x, y)
        floor = {"parts": cost.as_dict(), "bytes": cost.total_bytes}
    elif spec["mode"] == "parallel":
        meter.reset()
        parts = []
        for plan in plans:
            module = build_module(net_spec, plan).to(device)
            set_transport_form(module, form)
            head = build_head(plan, info.num_classes).to(device)
            parts.append((module, head, SGD([*module.parameters(), *head.parameters()], 0.01,
                                            0.9, 5e-4)))

        def step() -> None:
            x, y = next(batches)
            for k, (module, head, opt) in enumerate(parts):
                x, _ = greedy_step(module, head, x, y, taus[k], 0.0, opt)

        timed(step)
        peaks.append(meter.read().peak_bytes)
        # Floor: every module's weights, grads and momentum, plus the largest single module's
        # activations and input (module k's backward frees them before k+1 runs).
        x, y = next(batches)
        costs = []
        for k, (module, head, _) in enumerate(parts):
            cost = greedy_step_cost(module, head, x, y, taus[k])
            costs.append(cost)
            x = module(x, need_transport=False)[0].detach()
        state = sum(c.weights_bytes + c.grads_bytes + c.optimizer_bytes for c in costs)
        largest = max(c.saved_activation_bytes + c.input_bytes for c in costs)
        floor = {"parts": {"weights_grads_optimizer_bytes": state,
                           "largest_module_activations_and_input_bytes": largest},
                 "bytes": state + largest}
    else:
        costs = []
        for k, plan in enumerate(plans):
            release_free_memory(device)
            meter.reset()
            module = build_module(net_spec, plan).to(device)
            set_transport_form(module, form)
            head = build_head(plan, info.num_classes).to(device)
            opt = SGD([*module.parameters(), *head.parameters()], 0.01, 0.9, 5e-4)
            shape = (b, plan.in_channels, plan.in_size, plan.in_size)

            def step(k=k, module=module, head=head, opt=opt, shape=shape) -> None:
                if k == 0:
                    x, y = next(batches)
                else:  # a batch as the cache reader hands it over: float32 features
                    x = torch.randn(shape, device=device)
                    y = torch.randint(0, info.num_classes, (b,), device=device)
                greedy_step(module, head, x, y, taus[k], 0.0, opt)

            timed(step)
            peaks.append(meter.read().peak_bytes)
            module_step_times.append(statistics.median(step_times[1:] or step_times))
            x = next(batches)[0] if k == 0 else torch.randn(shape, device=device)
            y = torch.randint(0, info.num_classes, (b,), device=device)
            costs.append(greedy_step_cost(module, head, x, y, taus[k]).as_dict())
            with torch.no_grad():
                features = module(x, need_transport=False)[0]
            head_saved = count_saved_activations(lambda head=head, f=features: head(f),
                                                 list(head.parameters()))[1]
            costs[-1]["head_bytes"] = (parameter_bytes(head) + 2 * trainable_bytes(head)
                                       + head_saved)
            # Everything of module k goes before module k+1's phase is reset and measured, as
            # in `edgetrain fit`: the step closure and the batches hold it too.
            del module, head, opt, step, x, y, features
        largest = max(range(len(costs)), key=lambda i: costs[i]["total_bytes"])
        floor = {"parts": costs[largest], "bytes": costs[largest]["total_bytes"],
                 "largest_module": largest, "per_module": costs}
    peak = max(peaks)
    return {
        "variant": spec["variant"], "method": method, "mode": spec["mode"],
        "modules": spec["modules"], "batch_size": b, "model": spec["model"],
        "transport_form": form if method == "trgl" else None,
        "dataset": spec["dataset"], "peak_bytes": peak,
        "training_only_bytes": max(0, peak - with_data) if meter.backend != "cuda" else peak,
        "framework_bytes": framework, "data_bytes": with_data - framework,
        "module_peaks_bytes": peaks,
        # The first step pays one-off costs (kernel selection, first allocations): leave it out.
        # Sequential: the sum over modules of one step each, i.e. one batch through all of them.
        "step_time_s": (sum(module_step_times) if module_step_times
                        else statistics.median(step_times[1:] or step_times)),
        "floor_bytes": floor["bytes"], "floor": floor, "meter": meter.description,
        "allocator": alloc.as_dict(),
        "device": str(device), "torch": torch.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
