"""Run CDD training with FastReID's ``launch`` and dump every rank's CDD state (used by test_fastreid.py).

    python tests/fastreid_dist_driver.py DUMP_DIR --num-gpus 2 --config-file CFG [KEY VALUE ...]

Each rank writes ``DUMP_DIR/rank<r>.pt``: masks, queue banks and counters, and the teacher
features of its OWN part of every batch (recorded at one DGC site as they reach the CDD
state), so a test can check what the ranks gathered.
"""
import sys

import torch

from cdd_plugin.integrations.fastreid import train_net
from cdd_plugin.integrations.fastreid.meta_arch import find_cdd
from cdd_plugin.integrations.fastreid.trainer import CDDTrainer
from fastreid.engine import default_argument_parser, launch
from fastreid.utils import comm


def main(args, dump_dir):
    cfg = train_net.setup(args)
    trainer = CDDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    state = find_cdd(trainer.model).state
    site = next(iter(state.compactors))
    local = []
    observe = state.observe

    def recording_observe(student_feats=None, teacher_feats=None):
        local.append(teacher_feats[site].detach().float().clone())
        return observe(student_feats, teacher_feats)

    state.observe = recording_observe
    trainer.train()
    torch.save({"rank": comm.get_rank(), "world": comm.get_world_size(), "site": site, "local": local,
                "iteration": state.iteration, "masks": {n: m.clone() for n, m in state.masks().items()},
                "queues": {n: q.bank().clone() for n, q in state.queues.items()}},
               f"{dump_dir}/rank{comm.get_rank()}.pt")


if __name__ == "__main__":
    dump_dir, argv = sys.argv[1], sys.argv[2:]
    args = default_argument_parser().parse_args(argv)
    launch(main, args.num_gpus, num_machines=1, machine_rank=0, dist_url="auto", args=(args, dump_dir))
