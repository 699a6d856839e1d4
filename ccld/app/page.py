"""The page: a form whose fields are /generate's parameters (sample.py's flags), a gallery,
Stop, "use as init", and a PNG info tab that reads a PNG's settings back into the form.

Every message shown is one line, HTML-escaped (Gradio renders them as HTML, and they may
quote what a user typed)."""

import html
import json
import traceback

import gradio as gr

from .. import cli
from ..errors import UserError, reason
from ..sample.png_files import read_text
from .engine import NO_LORA, read_upload

# No font is fetched from elsewhere: the page works offline.
THEME = gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                          font_mono=['ui-monospace', 'monospace'])


class ImageUpload(gr.Image):
    """An image field that hands the function the uploaded file as it is (its path), and
    turns a file Gradio cannot open (not an image, or too many pixels) into one line."""
    is_template = True  # drawn as gr.Image

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception as e:  # noqa: BLE001 - whatever fails to open is "unreadable"
            raise one_line(f'cannot read the {self.label.lower()} ({type(e).__name__}: '
                           f'{reason(e)}); upload a PNG, JPEG or WebP image.') from None


def one_line(error):
    return gr.Error(html.escape(str(error), quote=False), print_exception=False)


def build(engine):
    """The gr.Blocks of the page, its events wired to `engine`."""
    args = engine.args
    names = list(engine.models)
    first = engine.defaults(names[0])

    with gr.Blocks(title='ccld', analytics_enabled=False) as page:
        gr.Markdown('## ccld: CLOOB-conditioned latent diffusion')
        with gr.Tab('Generate'):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label='Prompts', lines=3, elem_id='prompt',
                                        placeholder='one a line: "text" or "text:weight"')
                    with gr.Row():
                        image_prompt = ImageUpload(label='Image prompt', type='filepath',
                                                   image_mode=None, height=160,
                                                   sources=['upload', 'clipboard'])
                        image_weight = gr.Number(label='Image prompt weight',
                                                 value=args.cond_scale)
                    with gr.Accordion('Image to image', open=False):
                        with gr.Row():
                            init_image = ImageUpload(label='Init image', type='filepath',
                                                     elem_id='init', image_mode=None, height=160,
                                                     sources=['upload', 'clipboard'])
                            strength = gr.Slider(0.01, 1.0, value=0.9, step=0.01,
                                                 label='Strength (1 keeps nothing of it)')
                with gr.Column(scale=2):
                    model = gr.Dropdown(names, value=names[0], label='Model')
                    about = gr.Markdown(describe(engine, names[0]))
                    with gr.Row():
                        # (any value: the engine checks it against the model's adapters)
                        lora = gr.Dropdown(lora_choices(engine, names[0]), value=NO_LORA,
                                           label='LoRA', allow_custom_value=True)
                        lora_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05,
                                                  label='LoRA strength', elem_id='lora_strength')
                    with gr.Row():
                        n = gr.Slider(1, args.max_images, value=min(args.n, args.max_images),
                                      step=1, label='Images')
                        seed = gr.Number(label='Seed (-1: random)', value=args.seed, precision=0,
                                         elem_id='seed')
                    with gr.Row():
                        steps = gr.Slider(1, args.max_steps, value=first.steps, step=1,
                                          label='Steps', elem_id='steps')
                        method = gr.Dropdown(list(cli.SAMPLING_METHODS), value=first.method,
                                             label='Sampler')
                        schedule = gr.Dropdown(list(cli.SCHEDULES), value=first.schedule,
                                               label='Schedule')
                    with gr.Row():
                        cond_scale = gr.Number(label='Guidance scale', value=args.cond_scale)
                        size = gr.Textbox(label='Size (WxH, or one number for a square)',
                                          value=cli.size_text(first.size))
            with gr.Row():
                run = gr.Button('Generate', variant='primary', elem_id='generate')
                stop = gr.Button('Stop', variant='stop', elem_id='stop')
            gallery = gr.Gallery(label='Images', columns=4, elem_id='gallery', format='png')
            with gr.Row():
                status = gr.Textbox(label='Status', interactive=False, elem_id='status')
                use_as_init = gr.Button('Use as init', elem_id='use-as-init')
            chosen = gr.State()
        with gr.Tab('PNG info'):
            png = gr.File(label='A PNG written by sample.py, evaluate.py or this page',
                          file_types=['.png'], type='filepath', elem_id='png')
            info = gr.JSON(label='Its metadata')

        form = [prompt, n, seed, steps, method, schedule, cond_scale, size, model, lora,
                lora_strength, image_prompt, image_weight, init_image, strength]

        def generate(prompt=None, n=None, seed=None, steps=None, method=None, schedule=None,
                     cond_scale=None, size=None, model=None, lora=None, lora_strength=None,
                     image_prompt=None, image_weight=None, init_image=None, strength=None,
                     progress=gr.Progress()):
            """Samples images as sample.py does with the same settings; returns the PNGs
            (with their settings as metadata) and a line with the seed used. (The defaults
            make every parameter optional in gradio_client: a field left out there takes
            the form's starting value, or none for the prompt and the images.)"""
            request = dict(prompt=prompt, n=n, seed=seed, steps=steps, method=method,
                           schedule=schedule, cond_scale=cond_scale, size=size, model=model,
                           lora=lora, lora_strength=lora_strength, image_prompt=image_prompt,
                           image_weight=image_weight, init_image=init_image,
                           strength=strength)
            try:
                result = engine.run(request, progress)
            except UserError as e:
                raise one_line(e) from None
            except Exception as e:  # noqa: BLE001 - one line on the page, the rest logged
                traceback.print_exc()
                raise one_line(f'the job failed ({type(e).__name__}: {reason(e)}); the '
                               'server log has the details.') from None
            for warning in result.warnings:
                gr.Warning(html.escape(warning, quote=False))
            return result.paths, result.message

        run.click(generate, form, [gallery, status], api_name='generate')
        stop.click(engine.stop, None, None, api_name='stop', concurrency_limit=None,
                   queue=False)
        model.input(lambda name: on_model(engine, name), model,
                     [lora, steps, method, schedule, size, about], api_visibility='private')
        gallery.select(selected, None, chosen, api_visibility='private')
        gallery.change(lambda: None, None, chosen, api_visibility='private')
        use_as_init.click(init_from, [chosen, gallery], init_image, api_visibility='private')
        png.upload(lambda path: read_png(engine, path), png, [info, *form],
                   api_visibility='private')
    return page


def describe(engine, name):
    """A line about a model of the menu: what it is and how it samples by default."""
    settings = engine.defaults(name)
    return (f'{settings.description}; by default {settings.steps} steps of '
            f'{settings.method}, size {cli.size_text(settings.size)}')


def lora_choices(engine, name):
    return [NO_LORA, *engine.models[name].adapters]


def on_model(engine, name):
    """The form's fields that follow the model: its adapters, its sampler (a student's
    own), its size."""
    settings = engine.defaults(name)
    return (gr.update(choices=lora_choices(engine, name), value=NO_LORA), settings.steps,
            settings.method, settings.schedule, cli.size_text(settings.size),
            describe(engine, name))


def selected(event: gr.SelectData):
    """The file of the gallery image clicked."""
    value = event.value
    return value['image']['path'] if isinstance(value, dict) else value


def init_from(chosen, images):
    """The image "Use as init" puts in the init field: the one clicked in the gallery, or
    its first."""
    if chosen is None and images:
        first = images[0]
        chosen = first[0] if isinstance(first, (tuple, list)) else first
    if chosen is None:
        raise gr.Error('there is no image to use yet: generate one first.',
                       print_exception=False)
    return chosen


def read_png(engine, path):
    """The metadata of a PNG written by sample.py, evaluate.py or the page, and the form's
    fields it gives values to (the others left as they are)."""
    keep = gr.update()
    if path is None:
        return [None] + [keep] * 15
    try:
        read_upload(path, 'PNG')  # its size checked before its chunks are read
        text = read_text(path)
    except UserError as e:
        raise one_line(e) from None
    except Exception as e:  # noqa: BLE001
        raise one_line(f'cannot read the PNG ({type(e).__name__}: {reason(e)}).') from None
    if 'prompts' not in text and 'prompt' not in text:
        gr.Warning('this PNG records no prompt: sample.py, evaluate.py and this page write '
                   'one.')

    def number(key, kind=float):
        try:
            return kind(text[key])
        except (KeyError, ValueError):
            return keep

    try:
        prompts = '\n'.join(f'{t}:{w:g}' for t, w in json.loads(text['prompts']))
    except (KeyError, ValueError, TypeError):
        prompts = text.get('prompt', keep)
    model = text.get('checkpoint')
    model = model if model in engine.models else keep
    lora, lora_strength = keep, keep
    if 'lora' in text and model is not keep:
        name, _, value = text['lora'].split(',')[0].rpartition(':')
        if name in engine.models[model].adapters:
            lora, lora_strength = name, float(value)
    elif model is not keep:
        lora = NO_LORA
    values = [prompts, number('n', int), number('seed', int), number('steps', int),
              text.get('method', keep), text.get('schedule', keep), number('cond_scale'),
              text.get('size', keep), model, lora, lora_strength, keep, keep, keep,
              number('strength')]
    return [text, *values]
