"""Every launch of an interpreted Triton kernel as Triton's compiler would see it (run under
TRITON_INTERPRET=1): used by warmup_keys.py (the specialization keys after the warm-up) and
sm90_variants.py (the variants to compile for Hopper)."""

from __future__ import annotations


def hook_launches(backend, on_launch) -> None:
    """From now on, every interpreted launch first calls ``on_launch(fn, jf, bound, spec, opts,
    kwargs)``: ``fn`` the kernel's Python function, ``jf`` the kernel as a JITFunction (its
    do_not_specialize lists kept), ``bound, spec, opts`` what Triton's binder for ``backend``
    makes of the launch's arguments, ``kwargs`` the launch's keyword arguments."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction, create_function_from_signature

    binders = {}
    interpreted_run = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if id(self) not in binders:
            kw = {k: v for k, v in self.kwargs.items()
                  if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
            jf = JITFunction(self.fn, **kw)
            binders[id(self)] = jf, create_function_from_signature(jf.signature, jf.params,
                                                                   backend)
        jf, binder = binders[id(self)]
        on_launch(self.fn, jf, *binder(*args, **kwargs), kwargs)
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
