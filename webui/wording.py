"""What the studio's form says, in the user's words: each option's label and what choosing it does
for the result (quality, memory, speed). The trainer's and the registry's help texts stay the
reference for the command line (docs/trainer.md, generated from them); formulas, equation numbers
and internal names belong there, not in the form."""

from __future__ import annotations

# method -> what it is, for someone choosing one
SUMMARIES = {
    "res-tuning": "Small tuners beside the model's attention and feed-forward layers, and the concept's "
                  "word learned with them: learns a concept with few parameters and keeps what the model already "
                  "draws. The paper's main method.",
    "bypass": "Tuners in a separate network beside the frozen model: no gradients through the model, so training "
              "needs less memory; learns the concept well on the demo model.",
    "lora": "Low-rank updates of the attention layers (the common LoRA): small files that other tools load too.",
    "adapter": "Small adapters after the feed-forward layers, inside the model: few parameters, learns slowly.",
    "prefix": "Learned extra keys and values in attention: the smallest files, learns little in short runs.",
    "prompt": "Learned extra tokens in attention: very small, learns little in short runs.",
    "full": "Every weight of the model trains: learns fastest, needs the most memory and forgets more of what the "
            "model knew; the download is a whole U-Net.",
}

# Why the form starts on the first method (webui.forms.FIRST_METHODS); the table that decided it is
# in docs/benchmarks.md.
PRESELECTED = ("Preselected: of every method, it drew the example concepts most often for the training time the "
               "examples take, and kept what the model knew (docs/benchmarks.md, \"Which method the studio preselects\").")

# Where tuners go, and which kind: the choices' labels
PLACES = {"attn1": "self-attention", "attn2": "cross-attention (reads the prompt)", "ff": "feed-forward", "block": "whole block",
          "resnet": "convolution (ResNet) blocks"}
KINDS = {"adapter": "adapter", "prefix": "prefix", "prompt": "prompt tokens", "convpass": "convolution (Convpass)"}
PARTS = {"down": "encoder (down blocks)", "mid": "middle block", "up": "decoder (up blocks)"}

# trainer option -> what it does for the run
TRAINER = {
    "instance_prompt": "names the concept with a rare token (sks) plus its class",
    "class_prompt": "the concept's class without the token, e.g. 'a shape': with prior preservation the model keeps "
                    "drawing ordinary ones",
    "with_prior_preservation": "first makes class images with the base model and trains on them too: the model "
                               "keeps its other shapes (takes a few minutes more before training starts)",
    "num_class_images": "how many class images prior preservation makes first: more keep the model's old drawings "
                        "better and take longer to make",
    "sample_batch_size": "class images made per batch: higher is faster and needs more memory",
    "prior_loss_weight": "how much the class images count against the concept's: higher keeps more of the model, "
                         "learns the concept less",
    "seed": "the same seed repeats the same run",
    "resolution": "image size while training: lower is faster and needs less memory, higher keeps detail",
    "center_crop": "crop each image from its centre (off: random crops, more variety)",
    "random_flip": "mirror images at random: more variety from few images",
    "cache_latents": "encode each image once and keep it: faster steps, the same training",
    "train_batch_size": "images per step: higher learns more smoothly and needs more memory",
    "gradient_accumulation_steps": "steps added up before each update: a bigger effective batch without more memory",
    "max_train_steps": "how long to train: more steps learn the concept better and take longer",
    "learning_rate": "how fast the tuner learns: too high forgets the model, too low learns nothing; left empty, "
                     "each method uses the rate that suits it on this model",
    "lr_scheduler": "how the learning rate changes during the run",
    "lr_warmup_steps": "steps at the start over which the learning rate ramps up",
    "adam_beta1": "the optimiser's momentum; the default suits almost every run",
    "adam_beta2": "the optimiser's second-moment decay; the default suits almost every run",
    "adam_weight_decay": "pulls weights towards zero; the default suits almost every run",
    "adam_epsilon": "the optimiser's numerical floor; the default suits almost every run",
    "max_grad_norm": "caps each update's size: steadier training",
    "snr_gamma": "weights the noise levels so the model learns from all of them (5 is usual); empty: off",
    "noise_offset": "a small value (0.05) helps with very dark or very bright images",
    "mixed_precision": "half precision on a GPU: less memory and faster; the tuner itself stays full precision",
    "gradient_checkpointing": "recomputes instead of storing: much less memory, slower steps",
    "use_8bit_adam": "an 8-bit optimiser (GPU): less memory",
    "enable_xformers_memory_efficient_attention": "xFormers attention on a GPU: less memory where it is installed",
    "validation_prompt": "prompts drawn during training, so you can watch the concept appear",
    "num_validation_images": "pictures per prompt each time samples are drawn",
    "validation_steps": "how often samples are drawn",
    "num_inference_steps": "denoising steps for samples and class images: fewer is faster, rougher",
    "guidance_scale": "how closely samples and class images follow the prompt",
    "checkpointing_steps": "how often the run saves a point it can resume from",
    "checkpoints_total_limit": "how many of those points are kept on disk",
    "recipe": "a named set of settings for everything not set here: 'paper' trains as the paper did (batch 8, "
              "centre crops and flips, its learning rate and guidance)",
    "image_interpolation_mode": "how images are resized to the training size: lanczos keeps detail, the usual choice",
}

# (method, option) -> (label, what it does); methods share the common ones under "*"
METHOD = {
    ("*", "blocks"): ("Where in the model", "the middle and decoder parts are the paper's choice; adding the encoder "
                                            "learns more and needs more memory and time"),
    ("*", "ops"): ("Beside which layers", "each place adds a few parameters; feed-forward learns fastest"),
    ("*", "dim"): ("Tuner size", "bigger learns more and sooner, with a bigger file and a little more memory"),
    ("*", "heads"): ("Attention heads", "of the prefix and prompt tuners; the default suits almost every run"),
    ("res-tuning", "tuners"): ("Tuners", "which kind of tuner sits beside which layer; one per layer. The default "
                                         "(adapters beside self-attention, feed-forward and the whole block) learned "
                                         "the examples best"),
    ("res-tuning", "resnet_dim"): ("Convolution tuner size", "of the tuners beside the convolution blocks: bigger "
                                                             "learns more, with a bigger file"),
    ("res-tuning", "identifier"): ("Concept word", "the word whose meaning trains with the tuners, so the concept "
                                                   "appears when a prompt names it; 'auto' takes the instance prompt's "
                                                   "word the class prompt lacks (sks); empty: the word stays as it was"),
    ("res-tuning", "off_concept_loss"): ("Keep other prompts", "holds what prompts without the concept word draw to "
                                                               "the original model's; 0 is off and forgets more"),
    ("bypass", "horizontal"): ("Tuner reading the model", "the tuner that reads the model's features at each tap"),
    ("bypass", "vertical"): ("Tuner between taps", "the tuner that carries the bypass from one tap to the next"),
    ("bypass", "taps"): ("Read from", "the parts of the model the bypass reads"),
    ("bypass", "text"): ("Read the prompt", "lets the bypass read the prompt, so the correction depends on "
                                            "what is asked; off: smaller, the same correction for every prompt"),
    ("bypass", "output"): ("How it joins the model", "how the bypass becomes the correction: 'zero-conv' maps it freely; "
                                                    "'gate' blends it with the model's own features, 'modulate' scales and "
                                                    "shifts them, 'rearrange' moves them (the last three: ablation rows)"),
    ("bypass", "depth"): ("Join point", "how many of the last decoder blocks redraw the correction: each keeps its "
                                        "activations for training, so more cost memory and time (the model's recipe shows "
                                        "its own); 0 joins at the very end: least memory, fastest"),
    ("bypass", "gradient"): ("Training signal", "how training reaches the bypass through the blocks after it: 'exact', or "
                                                "shortcuts that keep less memory and approximate it (ablation rows)"),
    ("bypass", "into"): ("Correction goes to", "a decoder block's input, or the noise prediction itself (an ablation "
                                               "row)"),
    ("bypass", "time"): ("Noise level", "lets the bypass see the noise level: an ablation row"),
    ("bypass", "refine"): ("Extra blocks", "blocks after the chain at the output's size: an ablation row"),
    ("bypass", "readouts"): ("Read-outs", "every tap reaches the output directly: an ablation row"),
    ("bypass", "off_concept_loss"): ("Keep other prompts", "how hard training keeps prompts that do not name the concept "
                                                           "as they were: an ablation row; 0: off"),
    ("bypass", "trigger"): ("Prompt gate", "scales the correction by how much the prompt names the concept: an "
                                           "ablation row"),
    ("lora", "rank"): ("Rank", "bigger learns more, with a bigger file"),
    ("lora", "lora_dropout"): ("Dropout", "drops part of each update's input while training, against copying the few "
                                          "images; 0: off"),
    ("lora", "alpha"): ("Strength (alpha)", "scales the update; equal to the rank is the usual choice"),
    ("lora", "targets"): ("Layers (optional)", "layer names to tune instead of the attention layers, comma-separated; "
                                               "empty: the attention layers"),
    ("lora", "text_encoder"): ("Text encoder layers (optional)", "also tune the text encoder: learns the word better, "
                                                                 "more memory; empty: off"),
    ("lora", "text_encoder_2"): ("Second text encoder (SDXL, optional)", "as above, for SDXL's second text encoder"),
}


def method_option(method: str, name: str) -> tuple[str, str]:
    """(label, help) of one of a method's options."""
    return METHOD.get((method, name)) or METHOD.get(("*", name)) or (name.replace("_", " ").capitalize(), "")


def choice_label(value: str) -> str:
    """A choice as a person reads it: "decoder (up blocks)" for "up"."""
    return PARTS.get(value) or PLACES.get(value) or KINDS.get(value) or value


def layout_choices(pairs) -> list[tuple[str, str]]:
    """(place, kind) pairs of a Res-Tuning layout as "adapter beside feed-forward" -> "ff=adapter"."""
    return [(f"{KINDS.get(k, k)} beside {PLACES.get(p, p)}", f"{p}={k}") for p, k in pairs]
