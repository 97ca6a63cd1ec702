#!/bin/bash
# How bench/results/bypass_ablation_cpu.{md,json} was joined: the runs below were made under
# working names (`bench.quality --variant`); --rename says which design each measured.
R=bench/results/bypass_ablation_cpu_runs
python -m bench.bypass_ablation --name bypass_ablation_cpu \
  --quality bench/results/quality.json $R/quality_noise_modulate.json $R/quality_1800_steps.json $R/quality_lr3e-3.json \
            $R/quality_readouts.json $R/quality_skip_path.json $R/quality_skip_attention.json $R/quality_film_refine_rearrange.json \
  --cost bench/results/bypass_ablation_cost_cpu_256px_b1.json bench/results/bypass_ablation_cost_cpu_512px_b2.json \
  --rename "d0 eps=Bypass +1+2+3 into the noise" --rename "d0 modulate=Bypass +1+2+3 modulating x_L" \
  --rename "d0 1800=Bypass +1+2+3 1800 steps" --rename "d0 lr3e-3=Bypass +1+2+3 lr 3e-3" \
  --rename "d0 pyramid=Bypass +1+2+3 read-outs" --rename "d2 skip=Bypass at depth 2 skip-path" \
  --rename "d2 resnets=Bypass at depth 2 skip-attention" \
  --note "Both cost runs shared the 2 cores with trainings and tests (load 3-5): their memory figures hold, their step times do not (e.g. inference 52 s against LoRA's 79 s at 512 px); the H200 rows of bypass_ablation.md are the time figures. A row's '-' was not measured: the quality of the first nine designs is in bypass_ablation.md (2 x 64 each, trained on the H200); the token gate and prior weight were tried on the heart (docs/bypass.md)."
