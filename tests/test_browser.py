"""The plugin in ComfyUI's real web UI: Debian's chromium, headless, driven by Playwright.

Needs COMFYUI_PATH and /usr/bin/chromium (or XDIT_CHROMIUM); skips with the reason otherwise. Never
runs `playwright install`: Playwright drives the system chromium through ``executable_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from comfy_host import PLUGIN_ROOT, ComfyHost, comfy_host, require_comfyui  # noqa: F401  (fixture)

CHROMIUM = os.environ.get("XDIT_CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = sorted((PLUGIN_ROOT / "example_workflows").glob("*.json"))
NODE_IDS = ("XDiTPool", "XDiTLoadModel", "XDiTParallelModel", "XDiTSampler", "XDiTSamplerAdvanced")
UI_TIMEOUT_MS = 60_000


def close_dialogs(page) -> list[str]:
    """Close every open dialog (first-run templates, missing-models notices); returns their texts."""
    texts = []
    for _ in range(5):
        masks = page.locator(".p-dialog-mask")
        if masks.count() == 0:
            break
        texts.extend(d.inner_text()[:300] for d in page.locator(".p-dialog").all())
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    return texts


@pytest.fixture(scope="module")
def page(comfy_host: ComfyHost):
    require_comfyui()
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium); "
                    "see README 'Host and browser tests'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need `pip install playwright`")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--disable-background-networking", "--no-sandbox",
                                                   "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(comfy_host.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager "
                                   "&& window.LiteGraph && window.LiteGraph.registered_node_types['XDiTSampler']",
                                   timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(1000)
            close_dialogs(page)  # the first-run template browser
            page.xdit_errors = errors  # type: ignore[attr-defined]
            yield page
        finally:
            browser.close()


def test_ui_loads_our_extension_and_nodes(page) -> None:
    assert page.evaluate("() => app.extensions.some(e => e.name === 'comfyui-xdit')")
    for node_id in NODE_IDS:
        widgets = page.evaluate("""(type) => {
            const node = LiteGraph.createNode(type);
            app.graph.add(node);
            const names = (node.widgets || []).map(w => w.name);
            app.graph.remove(node);
            return names;
        }""", node_id)
        assert widgets, f"{node_id} has no widgets in the UI"
    assert not [e for e in page.xdit_errors if "xdit" in e.lower()], page.xdit_errors


def test_pool_settings_are_defaults_of_new_pool_nodes(page) -> None:
    values = page.evaluate("""async () => {
        await app.extensionManager.setting.set('xDiT.Pool.RayAddress', '10.1.2.3:6379');
        await app.extensionManager.setting.set('xDiT.Pool.NetworkInterface', 'eth1');
        await app.extensionManager.setting.set('xDiT.Pool.GPUs', '1,2,3');
        const node = LiteGraph.createNode('XDiTPool');
        app.graph.add(node);
        const values = Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
        app.graph.remove(node);
        await app.extensionManager.setting.set('xDiT.Pool.RayAddress', '');
        await app.extensionManager.setting.set('xDiT.Pool.NetworkInterface', '');
        await app.extensionManager.setting.set('xDiT.Pool.GPUs', 'auto');
        return values;
    }""")
    assert values == {"ray_address": "10.1.2.3:6379", "network_interface": "eth1", "gpus": "1,2,3"}


def test_settings_dialog_shows_our_settings(page) -> None:
    page.evaluate("() => app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
    dialog = page.locator(".p-dialog").filter(has_text="Keybinding").first  # the settings dialog
    dialog.wait_for(state="visible")
    dialog.get_by_text("xDiT", exact=True).first.click()
    dialog.get_by_text("Ray address", exact=False).first.wait_for(state="visible")
    dialog.get_by_text("Network interface", exact=False).first.wait_for(state="visible")
    dialog.get_by_text("GPUs of the embedded pool", exact=False).first.wait_for(state="visible")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_example_workflow_loads_without_missing_nodes(page, comfy_host: ComfyHost, workflow: Path) -> None:
    served = comfy_host.get_json("/api/workflow_templates")
    assert workflow.stem in served.get("comfyui-xdit", []), served
    data = json.loads(workflow.read_text())
    result = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        const nodes = app.graph.nodes;
        return {
            count: nodes.length,
            missing: nodes.filter(n => !LiteGraph.registered_node_types[n.type] || n.has_errors).map(n => n.type),
            xdit: nodes.filter(n => n.type.startsWith('XDiT')).map(n => [n.id, n.widgets.map(w => w.value)]),
        };
    }""", data)
    assert result["missing"] == [], result
    assert result["count"] == len(data["nodes"])
    # by node id: a workflow may hold two nodes of one type (Wan 2.2's two experts and their two samplers)
    saved = {n["id"]: n["widgets_values"] for n in data["nodes"] if n["type"].startswith("XDiT")}
    for node_id, values in result["xdit"]:
        assert values[:len(saved[node_id])] == saved[node_id], (node_id, values, saved[node_id])
    dialogs = close_dialogs(page)  # a missing-models notice is expected (no Flux weights here); missing nodes not
    assert not [d for d in dialogs if "missing" in d.lower() and "node" in d.lower()], dialogs


def test_pool_status_tab(page) -> None:
    page.evaluate("""() => {
        const tab = app.extensionManager.sidebarTab?.sidebarTabs?.find(t => t.id === 'xdit-pool-status');
        if (!tab) throw new Error('xDiT sidebar tab not registered');
    }""")
    close_dialogs(page)
    page.locator(".xdit-pool-status-tab-button").first.click()
    body = page.locator(".xdit-status-body")
    body.wait_for(state="visible")
    page.wait_for_function("() => !document.querySelector('.xdit-status-body').textContent.startsWith('Loading')")
    text = body.inner_text()
    assert "Pool status unavailable" not in text, text
    assert "Pool: embedded" in text or "No xDiT pool is running" in text, text
