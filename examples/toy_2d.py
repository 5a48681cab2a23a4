"""DMD2 on a 2-D toy: a custom teacher (an exact Gaussian-mixture denoiser), a custom student.

The teacher is any callable ``x0 = f(x_t, t, cond)`` on a named schedule; the student and
critic are the user's own networks. Runs in about a minute on a laptop CPU:

    python examples/toy_2d.py
"""
import torch

from diffusion_distill.student import generate
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, toy_teacher

torch.manual_seed(0)
teacher = toy_teacher(k=8, var=0.02, schedule="flow")
recipe = {
    "name": "toy_2d_dmd2",
    "teacher": {"path": None, "guidance": 1.0},
    "student": {"num_steps": 1},
    "method": {"name": "dmd2", "critic_steps": 5},
    "data": {"source": "prompts", "prompts": [""]},
    "train": {"steps": 1500, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.99,
              "checkpoint_every": 500, "log_every": 100, "device": "cpu"},
    "output": {"dir": "runs/toy_2d_dmd2"},
}
networks = {"student": MLPDenoiser(), "critic": MLPDenoiser()}
data = teacher.denoiser.backbone.fn.sample(2000, torch.Generator().manual_seed(1))


def student_samples(nets, role):
    return generate(nets, [""] * 2000, [1.0], torch.Generator().manual_seed(2), role=role)


if __name__ == "__main__":
    run_dir, nets = train(recipe, teacher=teacher, networks=networks, return_nets=True)
    teacher_50 = teacher.sample([""] * 2000, steps=50, generator=torch.Generator().manual_seed(2))
    teacher_1 = teacher.sample([""] * 2000, steps=1, generator=torch.Generator().manual_seed(2))
    print("energy distance to the data (lower is better):")
    print(f"  teacher, 50 steps : {energy_distance(teacher_50, data):.4f}")
    print(f"  teacher, 1 step   : {energy_distance(teacher_1, data):.4f}")
    print(f"  DMD2 student, 1 step (EMA): {energy_distance(student_samples(nets, 'ema'), data):.4f}")
