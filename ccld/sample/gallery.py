"""Images side by side: one comparison grid per prompt (a column per checkpoint, a row per
starting noise, labelled) and an index.html that shows them all with their prompts and
scores, with relative links only, so it opens from disk (or a copied folder) without a
server."""

import html
import math
import re
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_write
from .report import number, sampler_text, summary

INK, PAPER = (0, 0, 0), (255, 255, 255)
TITLE_LINES, LABEL_LINES = 3, 2
# index.html shows a grid's tiles at least this wide (scaled by a whole factor, pixels
# kept sharp), so that small images can be judged; a click opens the grid itself.
SHOWN_TILE = 256


def font(size):
    """Pillow's own scalable font (no font files to find); its bitmap font where Pillow
    is older than 10.1 or built without FreeType."""
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def wrap(text, width, face, max_lines):
    """Greedy word wrap to `width` pixels, also breaking after '/' and '-' (file paths and
    names have no spaces); a line that still does not fit, or the last one kept of too
    many, ends in '...'."""
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength
    lines, line = [], ''
    for word in text.split():
        for i, piece in enumerate(re.findall(r'[^/-]+[/-]?|[/-]', word)):
            trial = line + (' ' if line and i == 0 else '') + piece
            if measure(trial, font=face) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = piece
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += ' ...'
    for i, kept in enumerate(lines):
        while measure(kept, font=face) > width and len(kept) > 4:
            kept = kept[:-4] + '...'
        lines[i] = kept
    return lines


def comparison_grid(tiles, columns, rows, title, notes=None):
    """One PIL image: `title` above, a label per column (and under it the column's note,
    such as its sampler) and per row, and tiles[row][col] (PIL images of one size, square
    or not) without gaps. Returns the image and where the tiles start ({'left', 'top',
    'tile_width', 'tile_height'}, and 'tile_size' where they are square: tile (r, c) is at
    left + c * tile_width, top + r * tile_height)."""
    size, tile_height = tiles[0][0].size  # (size: the tile width, which the labels share)
    pad = max(4, min(size, tile_height) // 32)
    face = font(max(11, min(20, min(size, tile_height) // 12)))
    line_height = int(face.size * 1.3) if hasattr(face, 'size') else 14
    draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    left = int(max(draw.textlength(row, font=face) for row in rows)) + 2 * pad
    width = left + len(columns) * size
    title_lines = wrap(title, width - 2 * pad, face, TITLE_LINES)
    column_lines = [wrap(label, size - pad, face, LABEL_LINES) for label in columns]
    if notes is not None:
        column_lines = [lines + wrap(note, size - pad, face, LABEL_LINES)
                        for lines, note in zip(column_lines, notes)]
    header = max(len(lines) for lines in column_lines)
    top = pad + len(title_lines) * line_height + pad + header * line_height + pad
    canvas = Image.new('RGB', (width, top + len(rows) * tile_height), PAPER)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_height), line, fill=INK, font=face)
    y = 2 * pad + len(title_lines) * line_height
    for c, lines in enumerate(column_lines):
        for i, line in enumerate(lines):
            draw.text((left + c * size + pad // 2, y + i * line_height), line, fill=INK,
                      font=face)
    for r, row in enumerate(rows):
        draw.text((pad, top + r * tile_height + pad), row, fill=INK, font=face)
        for c, tile in enumerate(tiles[r]):
            canvas.paste(tile.convert('RGB'), (left + c * size, top + r * tile_height))
    square = {'tile_size': size} if size == tile_height else {}
    return canvas, {'left': left, 'top': top, 'tile_width': size, 'tile_height': tile_height,
                    **square}


def shown_size(grid):
    """(width, height) a grid is shown at: its tiles scaled by a whole factor to at least
    SHOWN_TILE pixels on their shorter side (the page narrows it further to fit the
    window)."""
    with Image.open(grid) as image:
        tile = min(int(image.text['tile_width']), int(image.text['tile_height']))
        factor = max(1, math.ceil(SHOWN_TILE / tile))
        return image.width * factor, image.height * factor


def write_index(path, report, title='ccld: compare models'):
    """index.html from a report (report.json's content; its paths relative to `path`'s
    folder) and its grids: the summary table with each checkpoint's sampler, then each
    prompt's grid, enlarged, with the prompt and its scores."""
    names = [c['name'] for c in report['checkpoints']]
    samplers = [sampler_text(c['settings'], full=True) for c in report['checkpoints']]
    e = html.escape
    rows = ''.join(
        f'<tr><td>{e(c["name"])}</td><td>{e(sampler)}</td>'
        f'<td>{number(c["frechet_distance"])}</td>'
        f'<td>{number(c["kid"])}</td><td>{number(c["cloob_score"])} ± '
        f'{number(c["cloob_score_std"], 2)}</td><td>{c["samples"]}</td>'
        f'<td><code>{e(c["sha256"][:12])}</code></td></tr>'
        for c, sampler in zip(report['checkpoints'], samplers))
    features = report['features']['network'] if report['features'] else 'no reference set'
    sections = []
    for prompt in report['prompts']:
        scores = ''.join(f'<li>{e(name)}: {number(score)}</li>'
                         for name, score in zip(names, prompt['cloob_scores']))
        grid = quote(prompt['grid'])
        width, height = shown_size(Path(path).parent / prompt['grid'])
        sections.append(
            f'<section id="line-{prompt["line"]}"><h2>{e(prompt["text"])}</h2>'
            f'<p class="meta">line {prompt["line"]} of {e(report["prompts_file"])}; CLOOB score '
            f'per checkpoint, the columns from left to right:</p><ul>{scores}</ul>'
            f'<a href="{grid}" title="the grid at its own size"><img class="grid" src="{grid}" '
            f'width="{width}" height="{height}" alt="{e(prompt["text"])}"></a></section>')
    page = f'''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:100%}}
img{{max-width:100%;height:auto}}
img.grid{{image-rendering:crisp-edges;image-rendering:pixelated}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}
.meta{{color:#555}}section{{margin:2em 0}}</style></head><body>
<h1>{e(title)}</h1>
<table><tr><th>checkpoint</th><th>sampler</th><th>Frechet distance ({e(features)})</th><th>KID</th>
<th>CLOOB score ± spread over prompts</th><th>images</th><th>sha256</th></tr>{rows}</table>
<p class="meta">{e(summary(report))} <a href="report.json">report.json</a>,
<a href="report.md">report.md</a></p>
{''.join(sections)}
</body></html>
'''
    with atomic_write(path) as f:
        f.write(page.encode('utf-8'))
    return Path(path)
