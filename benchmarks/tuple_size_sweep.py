"""Why MultiMix at the paper's setting trails ERM in a short run: a sweep of tuple length, alpha and clean loss.

Trains the demo's SmallCNN for 2 epochs on the embedded Fashion-MNIST subset (seed 0, batch 128, n = 1000) with each
configuration and prints the test metrics; run from the repository root: ``python benchmarks/tuple_size_sweep.py``
(or name configurations: ``python benchmarks/tuple_size_sweep.py erm "mm a1 m=2"``). About 2 minutes a row on 2 cores.
"""
import sys, time, torch, lightning as L
from torch.utils.data import DataLoader
from lightning_multimix import MultiMix
from lightning_multimix.classifier import ImageClassifier
from lightning_multimix.data import load_fashion_mnist
train, test = load_fashion_mnist()
configs = {
 "erm": None,
 "mm a1 m=b": dict(),
 "mm a1 m=b clean1": dict(clean_loss_weight=1.0),
 "mm a0.1 m=b": dict(alpha=0.1),
 "mm a1 m=2": dict(tuple_size=2),
 "mm a1 m=8": dict(tuple_size=8),
 "pairs": dict(mode="pairs"),
}
sel = sys.argv[1:] or list(configs)
for name in sel:
    kw = configs[name]
    L.seed_everything(0, verbose=False)
    model = ImageClassifier("small_cnn", num_classes=10, in_channels=1)
    cbs = [] if kw is None else [MultiMix(n_tuples=1000, seed=0, **kw)]
    t = L.Trainer(max_epochs=2, callbacks=cbs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    t0 = time.time()
    t.fit(model, DataLoader(train, batch_size=128, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)))
    r = t.test(model, DataLoader(test, batch_size=500), verbose=False)[0]
    print(f"RESULT {name:22s} {r} {time.time()-t0:.0f}s", flush=True)
