"""Worker classes for napari's ``create_worker`` that suit the plugin's widgets.

napari's own worker classes relay every error to the notification manager
as a traceback; the plugin's widgets show their own message instead, so
these classes leave the relay out.
"""

from superqt.utils import FunctionWorker, GeneratorWorker


class ClosingGeneratorWorker(GeneratorWorker):
    """Generator worker that closes its generator however the work ends.

    superqt's worker leaves the generator suspended when it is aborted (napari
    aborts workers when its window closes), so the generator's ``finally``
    blocks would run only at garbage collection. Closing it at once ends
    training cleanly and releases the device memory.
    """

    def work(self):
        try:
            return super().work()
        finally:
            self._gen.close()


__all__ = ["ClosingGeneratorWorker", "FunctionWorker"]
