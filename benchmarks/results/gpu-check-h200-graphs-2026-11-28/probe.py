"""CUDA-graph probe: one host, 20 FMNIST clients, batched steps graphed vs eager whole-stack vs prefix vs sequential."""
import statistics, sys, time, warnings
import numpy as np, torch
from fmlray.config import load_config
from fmlray.engine import batched
from fmlray.engine.host import ClientHost, initial_global_state
from fmlray.simulation import prepare

root, dev = sys.argv[1], sys.argv[2]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.set_num_threads(1)
MODELS = [("lenet5", "fedavg"), ("lenet5", "fml"), ("cnn5", "fml"), ("mlp", "fedprox")][:int(sys.argv[3]) if len(sys.argv) > 3 else None]
for model, algo in MODELS:
    res = {}
    for mode in ("graph", "eager-whole", "prefix", "sequential"):
        cfg = load_config(None, [f"data.dataset='fmnist'", f"data.root='{root}'", "data.max_train_samples=10000",
            "clients.num_clients=20", f"clients.groups=[{{name='all', share=1.0, local_model='{model}'}}]",
            f"model.meme='{'mlp' if model == 'mlp' else model}'", "training.epochs=1", "training.batch_size=32",
            f"algorithm.name='{algo}'", f"training.batching='{'sequential' if mode == 'sequential' else 'vmap'}'",
            "training.max_batched_clients=1000", "run.seed=0"])
        batched.WHOLE_STACK = () if mode == "prefix" else ("cuda", "cpu")
        prepared = prepare(cfg)
        host = ClientHost(cfg, prepared.dataset, prepared.partition, list(range(20)), device=dev)
        host.batcher.graphs = mode == "graph"
        g = initial_global_state(cfg, prepared.dataset)
        times = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for rnd in range(1, 6):
                sync(); t0 = time.perf_counter()
                partial, rows = host.train(rnd, list(range(20)), g)
                sync(); times.append(time.perf_counter() - t0)
        sums = {k: np.asarray(v) for k, v in partial.sums.items()}
        res[mode] = (statistics.median(times[1:]), sums, host.batcher.replays, [str(w.message)[:200] for w in caught])
        host.close()
    base = res["prefix"][1]
    for mode, (t, sums, replays, warns) in res.items():
        diff = max(float(np.max(np.abs(sums[k] - base[k]))) for k in base)
        scale = max(float(np.max(np.abs(base[k]))) for k in base)
        print(f"{model} {algo} {mode:12s} {t*1e3:8.1f} ms/round  replays {replays:5d}  max|sum-prefix| {diff:.2e} (scale {scale:.2e}) warnings {warns[:2]}", flush=True)
    print(f"{model} {algo}: graph vs prefix {res['prefix'][0]/res['graph'][0]:.2f}x, vs sequential {res['sequential'][0]/res['graph'][0]:.2f}x", flush=True)
