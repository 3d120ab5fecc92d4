"""One `edgetrain profile` measurement, run in a fresh subprocess so its peak is its own.

    python -m edgetrain.profiler.worker '<json spec>'   ->  one JSON line on stdout

Phases, each measured apart:

1. framework: Python + torch imported, one tiny conv trained one step (loads the CPU kernels
   and autograd); nothing of the model exists. Resident memory after it is the framework
   baseline.
2. data: the training set loaded (uint8 tensors in memory).
3. training: ``steps`` real training steps of the variant; the meter is reset before each
   module (sequential) or before the whole variant.
4. analysis, after every measured phase (what it builds and imports must not land in a
   measured peak): each phase's counted floor (edgetrain/memory/costs.py) and its
   tensor-level peak, the largest total of live tensors in one step (torch's profiler records
   every allocation and free), which the breakdown sets between the floor and the measured
   peak.

``training-only`` = peak of (3) minus resident memory after (2).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from edgetrain.memory import allocator
from edgetrain.memory.breakdown import parameter_bytes, trainable_bytes
from edgetrain.memory.meter import MemoryMeter, current_rss_bytes, release_free_memory
from edgetrain.training.sgd import SGD


def warm_up() -> None:
    conv = torch.nn.Conv2d(1, 2, 3)
    opt = SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()


def tensor_peak_bytes(step) -> int:
    """The largest total of tensor bytes allocated and not yet freed during ``step()``, from
    torch's profiler (every CPU or CUDA allocation and free it records), counted from the
    start of the step: what the step adds to the tensors alive before it."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            events.append((event.start_time_ns, event.typed[1].alloc_size))
    live = top = 0
    for _, size in sorted(events):
        live += size
        top = max(top, live)
    return top


def main(spec: dict) -> dict:
    device = torch.device(spec.get("device", "cpu"))
    method, mode = spec["method"], spec["mode"]
    checkpointing = method == "e2e-ckpt" or spec.get("checkpointing", False)
    # The policy `edgetrain fit` runs under for this method and mode.
    alloc = allocator.apply(device.type, None if method.startswith("e2e") else mode,
                            checkpointing)
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    meter = MemoryMeter(device)
    warm_up()
    release_free_memory(device)
    framework = current_rss_bytes()

    from edgetrain.config import FitConfig
    from edgetrain.data import augment_batch, iterate_batches, load_dataset, normalize
    from edgetrain.memory.costs import NetworkCosts
    from edgetrain.memory.layout import choose_split
    from edgetrain.models.families import network_spec
    from edgetrain.models.network import set_transport_form
    from edgetrain.training.phase import Optim, Phase
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
    b, steps = spec["batch_size"], spec["steps"]
    greedy = not method.startswith("e2e")
    costs = NetworkCosts.count(net_spec, info.image_size, info.num_classes,
                               need_transport=method == "trgl")
    # The split `edgetrain fit` would train (the layout planner's), counted for this variant:
    # with checkpointing, blocks cost their input, so the best cuts move.
    head_choice = spec.get("head", "dgl")
    if not greedy and head_choice == "auto":
        head_choice = "dgl"  # as fit does: end to end, the last head is the classifier
    layout = choose_split(net_spec, costs, spec["modules"] if greedy else 1, info.image_size,
                          spec.get("split", "memory"), head_choice, b, checkpointing)
    plans = layout.plans(net_spec, info.image_size)
    taus = (tau_schedule(spec["tau"], len(plans)) if method == "trgl"
            else [float("inf")] * len(plans))
    form = spec.get("transport_form", "bn")
    generator = torch.Generator().manual_seed(0)
    release_free_memory(device)  # what counting the costs allocated

    def real_batches():
        while True:
            for images, labels in iterate_batches(data.train, b, True, generator, True):
                images = augment_batch(images.to(device), info.crop_padding, info.hflip,
                                       generator)
                x = normalize(images, info)
                del images
                yield x, labels.to(device)

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

    # fit's own optimiser settings (its defaults): the momentum buffers are part of the peak.
    optim = Optim.of(FitConfig())

    def build(plan, k) -> Phase:
        phase = Phase.module(net_spec, plan, info.num_classes, device, optim, steps, taus[k],
                             seed=k, checkpointing=checkpointing)
        set_transport_form(phase.model, form)
        return phase

    def build_network() -> Phase:
        return Phase.end_to_end(net_spec, plans, info.num_classes, device, optim, steps,
                                checkpointing=checkpointing)

    def module_input(k, plan):
        if k == 0:
            return next(batches)
        # A batch as the cache reader hands it over: float32 features.
        return (torch.randn(b, plan.in_channels, plan.in_size, plan.in_size, device=device),
                torch.randint(0, info.num_classes, (b,), device=device))

    # --- 3. the measured phases ---------------------------------------------------------------
    peaks: list[int] = []
    starts: list[int] = []  # resident memory when each phase's meter was reset
    if not greedy:
        meter.reset()
        starts.append(current_rss_bytes())
        network = build_network()

        def e2e_step() -> None:
            network.step(*next(batches))

        timed(e2e_step)
        peaks.append(meter.read().peak_bytes)
        del network, e2e_step
    elif mode == "parallel":
        meter.reset()
        starts.append(current_rss_bytes())
        parts = [build(plan, k) for k, plan in enumerate(plans)]

        def parallel_step() -> None:
            x, y = next(batches)
            for phase in parts:
                x, _ = phase.step(x, y)

        timed(parallel_step)
        peaks.append(meter.read().peak_bytes)
        del parts, parallel_step
    else:
        for k, plan in enumerate(plans):
            release_free_memory(device)
            meter.reset()
            starts.append(current_rss_bytes())
            phase = build(plan, k)

            def module_step(k=k, plan=plan, phase=phase) -> None:
                phase.step(*module_input(k, plan), keep_output=False)

            timed(module_step)
            peaks.append(meter.read().peak_bytes)
            module_step_times.append(statistics.median(step_times[1:] or step_times))
            # Everything of module k goes before module k+1's phase is reset and measured, as
            # in `edgetrain fit`: the step closure holds it too.
            del phase, module_step
    gc.collect()
    release_free_memory(device)

    # --- 4. analysis: counted floors and tensor-level peaks, after every measured phase ------
    counts = ([layout_count(costs, plans, b, checkpointing)] if not greedy else
              [costs.module_count(p.start, p.stop, p.head, b, checkpointing) for p in plans])
    tensor_peaks: list[int] = []
    if not greedy:
        network = build_network()

        def e2e_step() -> None:
            network.step(*next(batches))

        e2e_step()  # momentum buffers exist from here on, as in the measured steps
        alive = parameter_bytes(network.model) + trainable_bytes(network.model)
        tensor_peaks.append(alive + tensor_peak_bytes(e2e_step))
        del network, e2e_step
    else:
        built = [build(plan, k) for k, plan in enumerate(plans)]
        alive = sum(parameter_bytes(p.model, p.head) + trainable_bytes(p.model, p.head)
                    for p in built)
        for k, (plan, phase) in enumerate(zip(plans, built)):

            def analysed_step(k=k, plan=plan, phase=phase) -> None:
                phase.step(*module_input(k, plan), keep_output=False)

            analysed_step()
            mine = parameter_bytes(phase.model, phase.head) + trainable_bytes(phase.model,
                                                                              phase.head)
            # Parallel mode: every module's weights and momentum are alive in every step.
            tensor_peaks.append((alive if mode == "parallel" else mine)
                                + tensor_peak_bytes(analysed_step))
        del built

    if mode == "parallel" and greedy:
        # One phase: every module's state, plus the largest single module's activations and
        # input (module k's backward frees them before k+1 runs).
        largest = max(range(len(counts)), key=lambda i: counts[i].floor_bytes
                      - counts[i].state_bytes)
        counts = [replace(counts[largest], state_bytes=sum(c.state_bytes for c in counts))]
        tensor_peaks = [max(tensor_peaks)]
    peak = max(peaks)
    peak_phase = max(range(len(peaks)), key=peaks.__getitem__)
    cuda = meter.backend == "cuda"
    phases = [{
        "peak_bytes": phase_peak,
        "training_only_bytes": phase_peak if cuda else max(0, phase_peak - with_data),
        "resident_before_bytes": 0 if cuda else max(0, start - with_data),
        "tensor_peak_bytes": tensors,
        "count": count.as_dict(),
    } for phase_peak, start, tensors, count in zip(peaks, starts, tensor_peaks, counts)]
    top = phases[peak_phase]
    breakdown = {
        # What the peak phase held, from the floor up: the counted floor's parts, then what
        # backward allocated on top (tensor peak - floor), then what the process held beyond
        # live tensors (allocator, kernels' scratch: measured - resident before - tensor peak),
        # and what was resident above framework + data when the phase's meter was reset (the
        # cost count and the layout for the first phase; earlier phases for later ones).
        **{k: v for k, v in top["count"].items() if k not in ("total_bytes", "floor_bytes",
                                                               "gradient_pair_bytes")},
        "backward_and_temporaries_bytes": top["tensor_peak_bytes"] - top["count"]["floor_bytes"],
        "allocator_and_other_bytes": (top["training_only_bytes"] - top["resident_before_bytes"]
                                      - top["tensor_peak_bytes"]),
        "resident_before_phase_bytes": top["resident_before_bytes"],
    }
    return {
        "variant": spec["variant"], "method": method, "mode": mode,
        "checkpointing": checkpointing,
        "modules": len(plans) if greedy else None, "batch_size": b, "model": spec["model"],
        "split": layout.strategy, "module_sizes": list(layout.sizes),
        "heads": list(layout.heads), "layout_reason": layout.reason,
        "transport_form": form if method == "trgl" else None,
        "dataset": spec["dataset"], "peak_bytes": peak,
        "training_only_bytes": peak if cuda else max(0, peak - with_data),
        "framework_bytes": framework, "data_bytes": with_data - framework,
        "module_peaks_bytes": peaks, "phases": phases, "peak_phase": peak_phase,
        # The first step pays one-off costs (kernel selection, first allocations): leave it out.
        # Sequential: the sum over modules of one step each, i.e. one batch through all of them.
        "step_time_s": (sum(module_step_times) if module_step_times
                        else statistics.median(step_times[1:] or step_times)),
        # The largest phase's counted floor (sequential: the largest module's, wherever the
        # measured peak fell), tensor-level peak and counted peak (floor + gradient pair).
        "floor_bytes": max(c.floor_bytes for c in counts),
        "tensor_peak_bytes": max(tensor_peaks),
        "counted_peak_bytes": max(c.total_bytes for c in counts),
        "breakdown": breakdown, "meter": meter.description,
        "allocator": alloc.as_dict(), "device": str(device), "torch": torch.__version__,
    }


def layout_count(costs, plans, batch: int, checkpointing: bool):
    """The whole network as one module with the last head: end-to-end training's count."""
    return costs.module_count(0, plans[-1].stop, plans[-1].head, batch, checkpointing)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
