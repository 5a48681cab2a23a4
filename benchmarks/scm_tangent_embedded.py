"""sCM's tangent on an embedded diffusers teacher: how much of it is the time embedding's wiggle?

On one batch of world latents noised at 16 times spread over the axis, the student (= the
teacher before training) gives ``df/du`` along the teacher's ODE direction ``(dx_u/du, 1)``
by ``torch.func.jvp``, split into its time part (tangent ``(0, 1)``) and its x part
(``(dx_u/du, 0)``), and by central differences of step ``h`` in the toolkit's time u
(``h`` 1e-3 is one train timestep). A backbone fed ``999 u`` through sinusoidal features of up
to 1 rad per timestep can vary inside a few timesteps; where the JVP differs from the
difference over a few timesteps by the JVP's own size, the exact tangent is that wiggle,
not the trajectory's trend. Reported per time: the relative gap ``|FD_h - JVP| / |JVP|``,
and the sCM target's two parts at r = 1, ``|term1| = |cos s (f - x0_T) / sin s|`` (the
teacher's pull) against ``|cos s df/ds|`` from the JVP and from each difference.

    python benchmarks/scm_tangent_embedded.py --teacher sd
    python benchmarks/scm_tangent_embedded.py --teacher sd3

Rows go to ``results/scm_tangent_embedded.json`` (docs/consistency.md, sCM on the embedded
teachers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from harness import HERE, provenance, write_json

TIMES = [0.002, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97,
         0.999]
STEPS = [1e-4, 1e-3, 5e-3, 1e-2, 2e-2]


def main(argv=None):
    import torch
    from conftest import tiny_recipe
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffusion_distill.build import setup_run
    from diffusion_distill.objectives.common import bcast
    from diffusion_distill.objectives.scm import contiguous_group_norm_inputs
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.world.data import ShapesWorld

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="sd", choices=["sd", "sd3"])
    p.add_argument("--sigma-data", type=float, default=1.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "scm_tangent_embedded.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = tiny_recipe(f"embedded:{a.teacher}", os.path.join(tmp, "run"),
                             method={"name": "scm", "sigma_data": a.sigma_data})
        recipe["data"] = {"source": "world", "resolution": 32}
        teacher, obj, nets = setup_run(load_recipe(recipe), "cpu")
    images, captions, _ = ShapesWorld(resolution=32).batch(len(TIMES), seed=1)
    u = torch.tensor(TIMES)
    with torch.no_grad():
        x0 = teacher.encode_images(images)
        cond = teacher.prompts(list(captions))
        (alpha, sigma, s), (d_alpha, d_sigma, d_s) = obj.trig(nets.schedule, u)
        x_t = (bcast(alpha, x0) * x0.double()
               + bcast(sigma, x0) * torch.randn_like(x0).double()).float()
        x0_T = nets.teacher(x_t, u, cond).double()
        eps_T = (x_t.double() - bcast(alpha, x0) * x0_T) / bcast(sigma, x0)
        v = (bcast(d_alpha, x0) * x0_T + bcast(d_sigma, x0) * eps_T).float()
        f = nets.student(x_t, u, cond).double()

        def student(x, t):
            return nets.student(x, t, cond)

        with nets.roles.use("student"), sdpa_kernel([SDPBackend.MATH]), \
                contiguous_group_norm_inputs(nets.network("student")):
            jvp = torch.func.jvp(student, (x_t, u), (v, torch.ones_like(u)))[1].double()
            time_part = torch.func.jvp(student, (x_t, u),
                                       (torch.zeros_like(v), torch.ones_like(u)))[1].double()
            x_part = torch.func.jvp(student, (x_t, u), (v, torch.zeros_like(u)))[1].double()
        obj.tangent = "finite_difference"
        fd = {}
        for h in STEPS:
            obj.fd_step = h
            fd[h] = obj.tangent_du(nets, x_t, u, v, cond, 1).double()

    def norm(z):
        return z.flatten(1).norm(dim=1)

    cos, sin, ds = bcast(s.cos(), x0), bcast(s.sin(), x0), bcast(d_s, x0)
    term1 = norm(cos * (f - x0_T) / sin)
    rows = []
    for i, t in enumerate(TIMES):
        rows.append({
            "u": t, "s": float(s[i]), "jvp": float(norm(jvp)[i]),
            "time_part": float(norm(time_part)[i]), "x_part": float(norm(x_part)[i]),
            "fd_rel_gap": {str(h): float(norm(fd[h] - jvp)[i] / norm(jvp)[i]) for h in STEPS},
            "term1": float(term1[i]), "cos_dfds_jvp": float(norm(cos * jvp / ds)[i]),
            "cos_dfds_fd": {str(h): float(norm(cos * fd[h] / ds)[i]) for h in STEPS}})
        r = rows[-1]
        print(f"u {t:.3f} s {r['s']:.3f} |df/du| {r['jvp']:7.1f} (time {r['time_part']:7.1f}, "
              f"x {r['x_part']:7.1f}) FD gap " + " ".join(
                  f"{h:g}:{r['fd_rel_gap'][str(h)]:.2f}" for h in STEPS)
              + f" | term1 {r['term1']:5.2f} cos df/ds jvp {r['cos_dfds_jvp']:6.2f} fd "
              + " ".join(f"{r['cos_dfds_fd'][str(h)]:6.2f}" for h in STEPS))
    out = {}
    if os.path.isfile(a.out):
        with open(a.out) as fh:
            out = json.load(fh)
    out[a.teacher] = {"rows": rows, **provenance("scm_tangent_embedded.py", argv)}
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
