"""The metrics registry: exact Prometheus text, escaping, histograms, and the serve metrics."""

from __future__ import annotations

import threading

import pytest

from reconciler.metrics import Metrics, format_value, serve_metrics


def test_render_a_small_registry_exactly() -> None:
    m = Metrics()
    passes = m.counter("app_passes_total", "Passes by result.", ["result"])
    alive = m.gauge("app_alive", "Things alive.")
    duration = m.histogram("app_seconds", "How long.", [0.5, 1, 5])
    passes.inc(result="failed")
    passes.inc(2, result="applied")
    passes.inc(result="applied")
    alive.set(7)
    duration.observe(0.2)
    duration.observe(0.5)
    duration.observe(3)
    duration.observe(60)

    assert m.render() == (
        "# HELP app_passes_total Passes by result.\n"
        "# TYPE app_passes_total counter\n"
        'app_passes_total{result="applied"} 3\n'
        'app_passes_total{result="failed"} 1\n'
        "# HELP app_alive Things alive.\n"
        "# TYPE app_alive gauge\n"
        "app_alive 7\n"
        "# HELP app_seconds How long.\n"
        "# TYPE app_seconds histogram\n"
        'app_seconds_bucket{le="0.5"} 2\n'
        'app_seconds_bucket{le="1"} 2\n'
        'app_seconds_bucket{le="5"} 3\n'
        'app_seconds_bucket{le="+Inf"} 4\n'
        "app_seconds_sum 63.7\n"
        "app_seconds_count 4\n"
    )


def test_an_empty_registry_renders_nothing() -> None:
    assert Metrics().render() == ""


def test_unlabelled_metrics_exist_before_their_first_update() -> None:
    m = Metrics()
    m.counter("c_total", "C.")
    m.histogram("h", "H.", [1])
    m.gauge("g", "G.", ["state"])
    assert m.render() == (
        "# HELP c_total C.\n# TYPE c_total counter\nc_total 0\n"
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 0\nh_bucket{le="+Inf"} 0\n'
        "h_sum 0\nh_count 0\n"
        "# HELP g G.\n# TYPE g gauge\n"
    )


def test_label_values_and_help_are_escaped() -> None:
    m = Metrics()
    g = m.gauge("g", 'Help with \\ and\nnewline and "quotes".', ["path"])
    g.set(1, path='C:\\dir\\"x"\nnext')
    assert m.render() == (
        '# HELP g Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE g gauge\n"
        'g{path="C:\\\\dir\\\\\\"x\\"\\nnext"} 1\n'
    )


def test_labels_render_in_declared_order_and_samples_sorted() -> None:
    m = Metrics()
    c = m.counter("hooks_total", "H.", ["provider", "result"])
    c.inc(result="ok", provider="gitlab")
    c.inc(result="bad", provider="github")
    c.inc(result="ok", provider="github")
    lines = m.render().splitlines()[2:]
    assert lines == [
        'hooks_total{provider="github",result="bad"} 1',
        'hooks_total{provider="github",result="ok"} 1',
        'hooks_total{provider="gitlab",result="ok"} 1',
    ]


def test_histogram_buckets_are_cumulative_per_label_set() -> None:
    m = Metrics()
    h = m.histogram("lat", "L.", [0.1, 1, 10], labels=["op"])
    for value in (0.05, 0.1, 0.5, 0.7, 2, 11):
        h.observe(value, op="a")
    h.observe(5, op="b")
    text = m.render()
    assert 'lat_bucket{op="a",le="0.1"} 2\n' in text  # le is inclusive
    assert 'lat_bucket{op="a",le="1"} 4\n' in text
    assert 'lat_bucket{op="a",le="10"} 5\n' in text
    assert 'lat_bucket{op="a",le="+Inf"} 6\n' in text
    assert 'lat_count{op="a"} 6\n' in text
    assert 'lat_bucket{op="b",le="1"} 0\n' in text
    assert 'lat_bucket{op="b",le="10"} 1\n' in text
    assert 'lat_sum{op="b"} 5\n' in text
    assert h.count(op="a") == 6


def test_gauge_replace_drops_stale_label_sets() -> None:
    m = Metrics()
    tasks = m.gauge("tasks", "T.", ["state"])
    tasks.replace({("running",): 3, ("failed",): 1})
    tasks.replace({("running",): 2, ("completed",): 5})
    assert m.render().splitlines()[2:] == [
        'tasks{state="completed"} 5',
        'tasks{state="running"} 2',
    ]
    tasks.replace({})
    assert m.render().splitlines()[2:] == []


def test_gauge_set_inc_dec() -> None:
    g = Metrics().gauge("g", "G.")
    g.set(5)
    g.inc()
    g.dec(3)
    assert g.get() == 3


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (0.25, "0.25"),
        (-2, "-2"),
        (1712345678.5, "1712345678.5"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
        (1e300, "1e+300"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_misuse_is_refused() -> None:
    m = Metrics()
    c = m.counter("c_total", "C.", ["result"])
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, result="x")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(stage="x")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(ValueError, match="already registered"):
        m.gauge("c_total", "again")
    with pytest.raises(ValueError, match="invalid metric name"):
        m.gauge("bad-name", "B.")
    with pytest.raises(ValueError, match="invalid label name"):
        m.gauge("g", "G.", ["bad-label"])
    with pytest.raises(ValueError, match="reserved"):
        m.histogram("h", "H.", [1], labels=["le"])
    with pytest.raises(ValueError, match="strictly increasing"):
        m.histogram("h2", "H.", [1, 1])
    g = m.gauge("g2", "G.", ["a", "b"])
    with pytest.raises(ValueError, match="takes labels"):
        g.replace({("x",): 1})


def test_updates_from_many_threads_are_not_lost() -> None:
    m = Metrics()
    c = m.counter("c_total", "C.", ["t"])
    h = m.histogram("h", "H.", [1])

    def work() -> None:
        for _ in range(2000):
            c.inc(t="x")
            h.observe(0.5)
            m.render()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get(t="x") == 8000
    assert h.count() == 8000


def test_serve_metrics_names_and_initial_series() -> None:
    sm = serve_metrics()
    sm.passes.inc(result="applied")
    sm.pass_duration.observe(1.5)
    sm.actions.inc(outcome="applied")
    sm.errors.inc(stage="observe")
    sm.proplets_alive.set(4)
    sm.tasks.replace({("running",): 3})
    sm.webhooks.inc(provider="github", result="accepted")
    sm.last_pass.set(1700000000.25)
    text = sm.render()
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == [
        "# TYPE propeller_passes_total counter",
        "# TYPE propeller_pass_duration_seconds histogram",
        "# TYPE propeller_actions_total counter",
        "# TYPE propeller_errors_total counter",
        "# TYPE propeller_proplets_alive gauge",
        "# TYPE propeller_tasks gauge",
        "# TYPE propeller_webhooks_total counter",
        "# TYPE propeller_last_pass_timestamp_seconds gauge",
    ]
    for line in (
        'propeller_passes_total{result="applied"} 1',
        'propeller_passes_total{result="unreachable"} 0',
        'propeller_passes_total{result="invalid"} 0',
        'propeller_errors_total{stage="observe"} 1',
        'propeller_errors_total{stage="fetch"} 0',
        'propeller_pass_duration_seconds_bucket{le="0.05"} 0',
        'propeller_pass_duration_seconds_bucket{le="2.5"} 1',
        'propeller_pass_duration_seconds_bucket{le="30"} 1',
        'propeller_pass_duration_seconds_bucket{le="+Inf"} 1',
        'propeller_actions_total{outcome="applied"} 1',
        "propeller_proplets_alive 4",
        'propeller_tasks{state="running"} 3',
        'propeller_webhooks_total{provider="github",result="accepted"} 1',
        "propeller_last_pass_timestamp_seconds 1700000000.25",
    ):
        assert line in text.splitlines()
    assert sm.render() == sm.registry.render()
