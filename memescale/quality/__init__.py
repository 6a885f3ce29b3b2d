"""Quality: Bradley-Terry heads on embeddings (`heads`: the model and its file, `train`:
training and `python -m memescale.quality train`), pairwise labels (`labels`) and the
labelling page (`label_app`, run as `python -m memescale.label`).
"""
