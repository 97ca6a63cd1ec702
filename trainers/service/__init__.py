"""The run service: what runs runs for the studio. The queue and the job runner (jobs), the caps of
a shared studio (limits), the Ray cluster backend (cluster, local_ray), run folders and uploads
checked before a run is queued (runs, uploads). It starts the training recipe
(`python -m trainers.dreambooth`) as a process and reads what it writes (trainers.events,
checkpoints); the recipe never imports it. Never imports gradio."""
