"""GUI responsiveness and thread-worker overhead of the Segment Anything widget (vit_b).

Run under an X server (Xvfb is enough)::

    xvfb-run -a env PYTHONPATH=src python benchmarks/bench_gui_responsiveness.py [--model vit_b] [--repeats 3]

Measures, alternating, on the same image and weights (random weights: values do not change
speed):

* ``direct``: the embedding computed on the main thread without napari
  (``SamEngine.embedding_steps`` drained, the same code the worker runs);
* ``worker``: the same embedding computed by the widget in its napari thread worker, timed
  inside the worker, while a QTimer ticks every 10 ms on the GUI thread and records the
  largest gap between ticks (the worst stall of the Qt event loop).

Prints the medians, the worker / direct ratio, the worst stall and torch's thread count as
seen in a fresh napari worker thread and in the widget's worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np

from _common import load_rgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", help="registry type (random weights)")
    parser.add_argument("--image", default="groceries.jpg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tick-ms", type=int, default=10)
    args = parser.parse_args()

    import napari
    import torch
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_sam.build import build_sam_type
    from napari_sam.interactive.engine import drain
    from napari_sam._napari._widget import SamWidget

    torch.manual_seed(0)
    model = build_sam_type(args.model).eval()
    rgb = load_rgb(args.image)
    viewer = napari.Viewer(show=True)
    viewer.add_image(rgb, name="image")
    widget = SamWidget(viewer)
    widget.set_model(model)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    app = QApplication.instance()
    engine = widget.engine

    def wait_idle(timeout_s: float = 600) -> None:
        """Run the Qt event loop (as napari does) until the widget has nothing left to do."""
        loop = QEventLoop()
        end = time.perf_counter() + timeout_s
        check = QTimer()
        check.setInterval(50)
        check.timeout.connect(lambda: loop.quit() if not widget.busy or time.perf_counter() > end else None)
        check.start()
        loop.exec_()
        check.stop()

    # torch's thread count in a fresh napari worker (before the engine adopts the main thread's).
    seen: list[int] = []
    probe = create_worker(lambda: torch.get_num_threads(), _start_thread=False)
    probe.returned.connect(seen.append)
    probe.start()
    while not seen:
        app.processEvents()
        time.sleep(0.01)

    # Instrument the engine: time the embedding inside whichever thread runs it.
    timings: list[tuple[str, float, int]] = []
    original = engine.embedding_steps

    spans: list[tuple[float, float]] = []

    cpu: list[float] = []

    def timed_steps(array):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = yield from original(array)
        end = time.perf_counter()
        cpu.append(time.process_time() - cpu_start)
        timings.append(("thread", end - start, torch.get_num_threads()))
        spans.append((start, end))
        return result

    engine.embedding_steps = timed_steps

    wait_idle()  # the widget's first (warm-up) embedding
    direct, worker, stalls, whole, direct_cpu, plain_live = [], [], [], [], [], []
    for repeat in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        drain(original(rgb))
        direct.append(time.perf_counter() - start)
        direct_cpu.append(time.process_time() - cpu_start)

        engine.cache.clear()
        ticks: list[float] = [time.perf_counter()]

        def tick() -> None:
            ticks.append(time.perf_counter())

        timer = QTimer()
        timer.setInterval(args.tick_ms)
        timer.timeout.connect(tick)
        timer.start()
        n_before = len(timings)
        widget.points_layer.add([100 + 10 * repeat, 200])  # a click: triggers embedding + prediction
        wait_idle()
        timer.stop()
        worker.append(timings[n_before][1])
        worker_cpu = cpu[n_before]
        begin, end = spans[-1]
        t = np.asarray(ticks)
        gaps_ms = np.diff(t) * 1000
        # a gap counts as "during the embedding" when it overlaps the worker's embedding span
        during = gaps_ms[(t[1:] > begin) & (t[:-1] < end)]
        stalls.append(float(during.max()))
        whole.append(float(gaps_ms.max()))
        # Control: the same embedding in a plain Python thread (no napari worker) while the
        # Qt event loop and the same timer run, so that both share the cores with a live GUI.
        engine.cache.clear()
        done: list[float] = []

        def plain() -> None:
            begin_plain = time.perf_counter()
            with torch.no_grad():
                drain(original(rgb))
            done.append(time.perf_counter() - begin_plain)

        timer = QTimer()
        timer.setInterval(args.tick_ms)
        timer.timeout.connect(tick)
        timer.start()
        thread = threading.Thread(target=plain)
        thread.start()
        loop = QEventLoop()
        check = QTimer()
        check.setInterval(20)
        check.timeout.connect(lambda: loop.quit() if not thread.is_alive() else None)
        check.start()
        loop.exec_()
        check.stop()
        timer.stop()
        thread.join()
        plain_live.append(done[0])
        print(
            f"repeat {repeat}: plain thread with live GUI {plain_live[-1]:.2f} s; direct {direct[-1]:.2f} s (CPU {direct_cpu[-1]:.1f} s), worker {worker[-1]:.2f} s "
            f"(CPU {worker_cpu:.1f} s, whole process), worst stall during the "
            f"embedding {during.max():.0f} ms ({len(during)} ticks, median gap {np.median(during):.1f} ms); "
            f"worst over the whole click (incl. drawing the result) {gaps_ms.max():.0f} ms",
            flush=True,
        )

    ratio = statistics.median(worker) / statistics.median(direct)
    print(f"model {args.model}, image {args.image} {rgb.shape[1]}x{rgb.shape[0]}, torch {torch.__version__}")
    print(f"torch threads: main {torch.get_num_threads()}, fresh napari worker {seen[0]}, "
          f"widget worker {timings[-1][2]}")
    print(f"embedding direct (main thread, no napari): median {statistics.median(direct):.2f} s {np.round(direct, 2)}")
    print(f"embedding in napari worker:               median {statistics.median(worker):.2f} s {np.round(worker, 2)}")
    live = statistics.median(worker) / statistics.median(plain_live)
    print(f"embedding in a plain thread, live GUI:    median {statistics.median(plain_live):.2f} s "
          f"{np.round(plain_live, 2)}")
    print(f"napari worker / plain thread (both with the live GUI): {live:.3f} ({100 * (live - 1):+.1f} %)")
    print(f"worker / direct: {ratio:.3f} ({100 * (ratio - 1):+.1f} %) wall time; "
          f"best of each: {min(worker) / min(direct):.3f}")
    cpu_ratio = statistics.median(cpu[-args.repeats:]) / statistics.median(direct_cpu)
    print(f"process CPU time during the embedding, worker / direct: {cpu_ratio:.3f} "
          f"(medians {statistics.median(cpu[-args.repeats:]):.1f} s / {statistics.median(direct_cpu):.1f} s)")
    print(f"load average during the run: {os.getloadavg()} on {os.cpu_count()} cores")
    print(f"worst Qt event-loop stall while embedding: {max(stalls):.0f} ms (per run: {np.round(stalls)}, "
          f"tick {args.tick_ms} ms)")
    print(f"worst stall over the whole click, incl. GUI-thread work on the result: {max(whole):.0f} ms "
          f"(per run: {np.round(whole)})")
    widget.close()
    viewer.close()


if __name__ == "__main__":
    main()
