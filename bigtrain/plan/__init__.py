"""Planning before anything starts: the memory plan per rank (`bigtrain check`, the start line). Imports config,
models and parallel (the layouts it plans for); nothing above."""
