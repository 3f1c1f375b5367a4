"""Input pipelines: synthetic tasks (MQAR) now, text through TensorFlow Datasets later."""
