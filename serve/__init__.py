"""Ray Serve for a trained cube run: `app.build_app` is the builder; one module per deployment
(ingress, embedder, predictor, generator), `settings` for the typed serve config, `http` for the
HTTP surface, `pipeline` and `bank` for the Ray-free model code. See docs/serving.md."""
