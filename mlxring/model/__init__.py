"""A model as files: facts from config.json (`facts`), tensors from the checkpoint (`weights`)."""
