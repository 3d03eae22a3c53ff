"""Same-run comparison on a CUDA GPU: the device augmentation as of fb3cce2 (augment_before.py) against the
current one, inside `skinlesion bench train`'s real loader + step. Usage: compare.py SHARDS OUTDIR (run.sh).

It also runs one `model_input` of each under torch.cuda.set_sync_debug_mode("error"): the old one blocks on
host-to-device copies, the new one must not. On a CPU it runs a scaled-down version, to check the script."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import skinlesion.train as train
from skinlesion import bench
from skinlesion.data import augment as augment_new
from skinlesion.data.pipeline import train_loader

sys.path.insert(0, str(Path(__file__).parent))
import augment_before

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
steps, workers, size, batch_size = (200, 14, 224, 128) if cuda else (3, 1, 64, 8)
impl = {"old": augment_before.augment, "new": augment_new.augment}
result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

loader = train_loader(
    shards,
    image_size=size,
    batch_size=batch_size,
    num_workers=workers,
    rank=0,
    world_size=1,
    seed=0,
    epoch=0,
    batches=4,
    shuffle_buffer=500,
    augment="device",
)
batches = list(loader)
result["sync_debug"] = {}
for name, fn in impl.items():
    if not cuda:
        break
    train.augment = fn
    train.model_input(batches[0], device, 0, 0, 0, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train.model_input(batches[1], device, 0, 0, 0, 1)
        result["sync_debug"][name] = "no synchronisation"
    except RuntimeError as e:
        result["sync_debug"][name] = "synchronises: " + str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)

x, affine = batches[2]["image"].to(device), batches[2]["affine"].to(device)
if not cuda:  # the CPU figure of docs/benchmarks.md: a batch of 32 at 224 px
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    affine = torch.tensor([[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]).expand(32, 2, 3)
key = f"augment_ms_per_batch_{len(x)}_at_{x.shape[-1]}px"
result[key] = {}
for name, fn in impl.items():
    times = []
    for i in range(20):
        bench._sync(device)
        start = time.perf_counter()
        fn(x, affine, augment_new.batch_generator(device, 0, 0, 0, i))
        bench._sync(device)
        times.append(time.perf_counter() - start)
    result[key][name] = statistics.median(times[5:]) * 1000

overrides = [
    f"data.shards={shards}",
    f"data.image_size={size}",
    f"data.batch_size={batch_size}",
    f"data.num_workers={workers}",
    "wandb.mode=disabled",
    "data.augment=device",
    "model.name=resnet50" if cuda else "model.name=resnet18",
    "train.mixed_precision=bf16" if cuda else "train.mixed_precision=no",
]
result["bench_train"] = {"old": [], "new": []}
for name in ("old", "new", "old", "new"):  # alternating, so drift in the machine hits both
    train.augment = impl[name]
    r = bench.bench_train(Path("configs/smoke.yaml"), overrides, steps=steps)
    result["bench_train"][name].append(r)
    print(
        f"{name}: {r['images_per_second']:.0f} images/s end to end, {r['step_images_per_second']:.0f} step only, "
        f"input-bound fraction {r['input_bound_fraction']:.3f}",
        flush=True,
    )
(out / "compare.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "bench_train"}, indent=2))
