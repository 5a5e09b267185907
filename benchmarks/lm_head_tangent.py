"""Where a tangent sweep's CPU goes on the lm-facts tail (issue 23; lds_lm.md): the same jvp sweep (32 training
sentences, 6 query tangents) through the frozen head by autograd (log_softmax of the 49k logits) vs frozen_head_nll."""
import argparse, time
import numpy as np, torch
torch.set_num_threads(1)
from forwardinf.experiments import lds_lm
from forwardinf.core.tangent import directional_sweep
from forwardinf.core.params import select_params, buffers_of
from forwardinf.models import pretrained
args = argparse.Namespace(model=None, tail_blocks=1, seed=0, quiet=True, **lds_lm.DEFAULTS)
setup = lds_lm.Setup(args, False)
names = [f"{m}.weight" for m in lds_lm.linear_modules(setup.tail)]
params = select_params(setup.tail, names)
gen = torch.Generator().manual_seed(0)
tangents = {k: torch.randn((6, *v.shape), generator=gen) * 1e-3 for k, v in params.items()}
from forwardinf.tasks.language_model import DictDataset
data = DictDataset({k: v[:32] for k, v in setup.train.tensors.items()})
def timed(label):
    c = time.process_time()
    out = directional_sweep(setup.task.loss, setup.tail, params, buffers_of(setup.tail), tangents, data, 16, torch.device("cpu"))
    print(f"{label}: {time.process_time() - c:.2f} CPU s", flush=True)
    return out
new = timed("frozen_head_nll (this branch)")
setup.tail.head.weight.requires_grad_(True)  # the fallback: autograd through log_softmax of the logits
old = timed("autograd through the head (before)")
setup.tail.head.weight.requires_grad_(False)
print("max rel diff", float((new - old).abs().max() / old.abs().max()))
