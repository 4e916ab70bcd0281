"""What MLflow's per-run system metrics (SystemMetricsMonitor) cost a trial.

    python benchmarks/system_metrics.py --tracking-uri http://127.0.0.1:5000 [--trial-seconds 20]

Two measures, against the given tracking store:
- blocking: wall time that start() + finish() add to the trial's own thread (finish joins the
  monitor thread, which reads the run once more, then flushes), median of repeats;
- background: CPU time the monitor thread takes per sample (psutil readings, a get_run and a
  log_batch), measured over samples taken every 0.5 s while the main thread sleeps.
The cost for a trial of --trial-seconds at the sampling interval kdtune would use is then
(blocking + samples x background) / trial seconds. Needs psutil.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--trial-seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name("system-metrics-cost") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("system-metrics-cost")

    blocking = []
    for _ in range(args.repeats):
        run_id = client.create_run(exp_id).info.run_id
        started = time.perf_counter()
        monitor = SystemMetricsMonitor(run_id, sampling_interval=args.interval, tracking_uri=args.tracking_uri)
        monitor.start()
        monitor.finish()
        blocking.append(time.perf_counter() - started)
        client.set_terminated(run_id)

    run_id = client.create_run(exp_id).info.run_id
    monitor = SystemMetricsMonitor(run_id, sampling_interval=0.5, tracking_uri=args.tracking_uri)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    monitor.start()
    time.sleep(10)
    monitor.finish()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    samples = max(1, len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")))
    client.set_terminated(run_id)
    per_sample = cpu / samples
    trial_samples = int(args.trial_seconds // args.interval)
    cost = (statistics.median(blocking) + trial_samples * per_sample) / args.trial_seconds
    print(json.dumps({"blocking_s_median": round(statistics.median(blocking), 4),
                      "blocking_s_max": round(max(blocking), 4), "cpu_s_per_sample": round(per_sample, 4),
                      "samples_in_10s_at_0.5s": samples, "wall_s": round(wall, 2), "trial_seconds": args.trial_seconds,
                      "interval_s": args.interval, "cost_fraction": round(cost, 4)}, indent=2))


if __name__ == "__main__":
    main()
